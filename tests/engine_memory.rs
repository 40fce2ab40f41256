//! The engine's end-to-end suite on the in-memory backend.

use agent_orchestra::Backends;

async fn make(_prefix: &str) -> Backends {
    Backends::memory()
}

async fn cleanup(_prefix: &str) {}

agent_orchestra::engine_suite!(make, cleanup);
