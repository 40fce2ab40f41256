//! The Lua scripts of the Redis backend, each loaded once (SCRIPT LOAD at connect, EVALSHA per
//! call). The sources live in `lua/`; the queue scripts share `lua/queue_prelude.lua`.
//! docs/backends/redis.md describes what each one does atomically.

use super::conn::{lua_script, LuaScript};

lua_script!(
    /// Adds messages to a queue (ready or delayed) and wakes consumers.
    ENQUEUE = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/enqueue.lua"))
);
lua_script!(
    /// Promotes, pops, dead-letters over-delivered messages and leases: one fetch.
    FETCH = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/fetch.lua"))
);
lua_script!(
    /// Deletes a delivered message if its receipt is live.
    ACK = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/ack.lua"))
);
lua_script!(
    /// Gives a delivered message back, now or after a delay.
    NACK = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/nack.lua"))
);
lua_script!(
    /// Extends a live lease.
    EXTEND = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/extend.lua"))
);
lua_script!(
    /// Moves a delivered message to the dead letters.
    DEAD_LETTER = concat!(
        include_str!("lua/queue_prelude.lua"),
        include_str!("lua/dead_letter.lua")
    )
);
lua_script!(
    /// Reads the newest dead letters.
    DEAD_LETTERS = concat!(
        include_str!("lua/queue_prelude.lua"),
        include_str!("lua/dead_letters.lua")
    )
);
lua_script!(
    /// Promotes what is due, then counts.
    STATS = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/stats.lua"))
);
lua_script!(
    /// Creates a task with its index entries, unless it exists.
    TASK_CREATE = include_str!("lua/task_create.lua")
);
lua_script!(
    /// Compare-and-set of a task's state, indexes included.
    TASK_TRANSITION = concat!(
        include_str!("lua/task_prelude.lua"),
        include_str!("lua/task_transition.lua")
    )
);
lua_script!(
    /// A fetch that also claims each delivered message's task (the worker's first step).
    FETCH_CLAIM = concat!(
        include_str!("lua/queue_prelude.lua"),
        include_str!("lua/task_prelude.lua"),
        include_str!("lua/task_check.lua"),
        include_str!("lua/fetch_claim.lua")
    )
);
lua_script!(
    /// Undoes a claim over a task hash that turned out unreadable.
    CLAIM_UNDO = include_str!("lua/claim_undo.lua")
);
lua_script!(
    /// Creates new PENDING tasks of one queue and announces them (the dispatcher's step).
    SUBMIT = concat!(include_str!("lua/queue_prelude.lua"), include_str!("lua/submit.lua"))
);
lua_script!(
    /// Records an outcome and settles its message (the worker's last step).
    RECORD = concat!(
        include_str!("lua/queue_prelude.lua"),
        include_str!("lua/task_prelude.lua"),
        include_str!("lua/record.lua")
    )
);
lua_script!(
    /// Deletes a batch of finished tasks beyond the retention.
    TASK_PURGE = include_str!("lua/task_purge.lua")
);
lua_script!(
    /// SET NX PX with a fencing token from a counter.
    LOCK_ACQUIRE = include_str!("lua/lock_acquire.lua")
);
lua_script!(
    /// PEXPIRE if the token matches.
    LOCK_EXTEND = include_str!("lua/lock_extend.lua")
);
lua_script!(
    /// DEL if the token matches.
    LOCK_RELEASE = include_str!("lua/lock_release.lua")
);
lua_script!(
    /// GET and PTTL in one step.
    LOCK_HOLDER = include_str!("lua/lock_holder.lua")
);

lua_script!(
    /// Moves one key of the global-index layout (before 2026-12-07) to the per-queue keys.
    MIGRATE_GLOBAL = include_str!("lua/migrate_global.lua")
);

/// Every script, for `SCRIPT LOAD` at connect time.
pub(crate) static ALL: [&LuaScript; 20] = [
    &ENQUEUE,
    &FETCH,
    &ACK,
    &NACK,
    &EXTEND,
    &DEAD_LETTER,
    &DEAD_LETTERS,
    &STATS,
    &TASK_CREATE,
    &TASK_TRANSITION,
    &FETCH_CLAIM,
    &CLAIM_UNDO,
    &RECORD,
    &SUBMIT,
    &TASK_PURGE,
    &LOCK_ACQUIRE,
    &LOCK_EXTEND,
    &LOCK_RELEASE,
    &LOCK_HOLDER,
    &MIGRATE_GLOBAL,
];
