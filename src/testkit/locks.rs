//! [`LockManager`] conformance: exclusivity, expiry, owner-only extend and
//! release, fencing tokens, and key validation.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::time::{sleep, Instant};

use super::{eventually, join_all, must, within, CALL_TIMEOUT};
use crate::{Backends, Error, Lease, LockManager};

/// Slack for backends that round expiry times.
const CLOCK_SLACK: Duration = Duration::from_millis(100);
/// A TTL long enough never to end during a test.
const LONG_TTL: Duration = Duration::from_secs(60);
/// A TTL short enough to watch it end.
const SHORT_TTL: Duration = Duration::from_secs(1);

async fn acquire(locks: &dyn LockManager, key: &str, owner: &str, ttl: Duration) -> Option<Lease> {
    let lease = must(
        format!("{owner} acquiring {key}"),
        locks.acquire(key, owner, ttl),
    )
    .await;
    if let Some(l) = &lease {
        assert_eq!(l.key, key, "the lease names another key");
        assert_eq!(l.owner, owner, "the lease names another owner");
        assert!(!l.token.is_empty(), "the lease has an empty token");
    }
    lease
}

async fn acquire_ok(locks: &dyn LockManager, key: &str, owner: &str, ttl: Duration) -> Lease {
    acquire(locks, key, owner, ttl)
        .await
        .unwrap_or_else(|| panic!("{owner} should have acquired the free lock {key}"))
}

/// Waits until `owner` acquires `key` (after somebody else's lease ends).
async fn acquire_eventually(
    locks: &dyn LockManager,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> Lease {
    eventually(
        format!("{owner} acquiring {key} once the previous lease ended"),
        CALL_TIMEOUT,
        || async {
            acquire(locks, key, owner, ttl)
                .await
                .ok_or_else(|| "still held".to_string())
        },
    )
    .await
}

async fn holder_owner(locks: &dyn LockManager, key: &str) -> Option<(String, u64)> {
    must(format!("holder of {key}"), locks.holder(key))
        .await
        .map(|h| (h.owner, h.fencing_token))
}

fn forged(lease: &Lease, owner: &str) -> Lease {
    Lease {
        owner: owner.to_string(),
        token: format!("forged-{}", uuid::Uuid::new_v4().simple()),
        ..lease.clone()
    }
}

/// While one owner holds a lock, another owner's acquire returns `None`.
pub async fn second_acquire_by_another_owner_gets_none(b: &Backends) {
    let locks = &*b.locks;
    let key = "leader_second_acquire";
    let first = acquire_ok(locks, key, "monitor-a", LONG_TTL).await;
    let second = acquire(locks, key, "monitor-b", LONG_TTL).await;
    assert!(
        second.is_none(),
        "monitor-b acquired a lock monitor-a holds: {second:?}"
    );
    assert_eq!(
        holder_owner(locks, key).await,
        Some(("monitor-a".to_string(), first.fencing_token)),
        "the holder after a refused acquire"
    );
    // Another key is independent.
    acquire_ok(
        locks,
        "leader_second_acquire_other_key",
        "monitor-b",
        LONG_TTL,
    )
    .await;
}

/// Twenty owners acquiring one free lock at the same moment: exactly one gets a lease.
pub async fn lock_is_exclusive_under_contention(b: &Backends) {
    const CONTENDERS: usize = 20;
    let key = "leader_contention";
    let barrier = Arc::new(tokio::sync::Barrier::new(CONTENDERS));
    let mut handles = Vec::new();
    for i in 0..CONTENDERS {
        let (locks, barrier) = (b.locks.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            let owner = format!("contender-{i:02}");
            barrier.wait().await;
            let lease = acquire(&*locks, key, &owner, LONG_TTL).await;
            (owner, lease)
        }));
    }
    let outcomes = within(
        "20 concurrent acquires",
        CALL_TIMEOUT * 3,
        join_all("contender", handles),
    )
    .await;
    let winners: Vec<(String, Lease)> = outcomes
        .into_iter()
        .filter_map(|(owner, lease)| lease.map(|l| (owner, l)))
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {CONTENDERS} contenders must get the lock, winners: {:?}",
        winners.iter().map(|(o, _)| o).collect::<Vec<_>>()
    );
    let (owner, lease) = &winners[0];
    assert_eq!(
        holder_owner(&*b.locks, key).await,
        Some((owner.clone(), lease.fencing_token)),
        "the holder must be the one winner"
    );
}

/// Each acquisition of a key gets a larger fencing token than the previous one: after a release,
/// and after an expiry.
pub async fn fencing_tokens_strictly_increase(b: &Backends) {
    let locks = &*b.locks;
    let key = "leader_fencing";
    let first = acquire_ok(locks, key, "monitor-a", LONG_TTL).await;
    assert!(
        must("release", locks.release(&first)).await,
        "the owner's release must succeed"
    );
    assert!(
        !must("second release of the same lease", locks.release(&first)).await,
        "releasing an already released lease must return false"
    );
    let second = acquire_ok(locks, key, "monitor-b", SHORT_TTL).await;
    assert!(
        second.fencing_token > first.fencing_token,
        "fencing token after a release: {} is not greater than {}",
        second.fencing_token,
        first.fencing_token
    );
    let third = acquire_eventually(locks, key, "monitor-c", LONG_TTL).await;
    assert!(
        third.fencing_token > second.fencing_token,
        "fencing token after an expiry: {} is not greater than {}",
        third.fencing_token,
        second.fencing_token
    );
    assert_eq!(
        holder_owner(locks, key).await,
        Some(("monitor-c".to_string(), third.fencing_token)),
        "the holder reports the latest fencing token"
    );
}

/// A lease that is not extended ends after its TTL: another owner can then acquire the lock, and
/// the old lease can neither release nor extend it.
pub async fn lock_expires_after_its_ttl(b: &Backends) {
    let locks = &*b.locks;
    let key = "leader_expiry";
    let asked_at = Instant::now();
    let old = acquire_ok(locks, key, "monitor-crashed", SHORT_TTL).await;
    assert!(
        acquire(locks, key, "monitor-next", LONG_TTL)
            .await
            .is_none(),
        "the lock was free right after monitor-crashed took it for {SHORT_TTL:?}"
    );
    let next = acquire_eventually(locks, key, "monitor-next", LONG_TTL).await;
    assert!(
        Instant::now() + CLOCK_SLACK >= asked_at + SHORT_TTL,
        "the lock was taken over before its {SHORT_TTL:?} TTL ended"
    );
    assert!(
        !must("release by the expired lease", locks.release(&old)).await,
        "an expired lease must not release the new holder's lock"
    );
    match within(
        "extend by the expired lease",
        CALL_TIMEOUT,
        locks.extend(&old, LONG_TTL),
    )
    .await
    {
        Err(Error::NotLockOwner { key: k }) => assert_eq!(k, key, "NotLockOwner names another key"),
        other => panic!("extending an expired lease should fail with NotLockOwner, got {other:?}"),
    }
    assert_eq!(
        holder_owner(locks, key).await,
        Some(("monitor-next".to_string(), next.fencing_token)),
        "the new holder after the expired lease tried to release and extend"
    );
}

/// The owner's extend moves the lease's end, so the lock stays held past its original TTL;
/// the extended lease keeps its token and fencing token and can release the lock.
pub async fn extend_by_owner_keeps_the_lock_past_its_ttl(b: &Backends) {
    let locks = &*b.locks;
    let key = "leader_extend";
    let acquired_at = Instant::now();
    let lease = acquire_ok(locks, key, "monitor-a", SHORT_TTL).await;
    let extended = must(
        "extend by the owner",
        locks.extend(&lease, Duration::from_secs(5)),
    )
    .await;
    assert!(
        extended.expires_at > lease.expires_at,
        "extend returned expires_at {} not after the original {}",
        extended.expires_at,
        lease.expires_at
    );
    assert_eq!(extended.token, lease.token, "extend changed the token");
    assert_eq!(
        extended.fencing_token, lease.fencing_token,
        "extend changed the fencing token"
    );
    sleep((acquired_at + Duration::from_millis(1500)).saturating_duration_since(Instant::now()))
        .await;
    assert!(
        acquire(locks, key, "monitor-b", LONG_TTL).await.is_none(),
        "monitor-b acquired the lock after its original TTL although the owner extended it"
    );
    assert_eq!(
        holder_owner(locks, key).await,
        Some(("monitor-a".to_string(), lease.fencing_token)),
        "the holder after the original TTL"
    );
    let again = must(
        "a second extend",
        locks.extend(&extended, Duration::from_secs(5)),
    )
    .await;
    assert!(
        must("release by the owner", locks.release(&again)).await,
        "the owner's release must succeed"
    );
    acquire_ok(locks, key, "monitor-b", LONG_TTL).await;
}

/// A lease with another token (whatever owner name it carries) can neither release nor extend
/// the lock: release returns `false`, extend fails with `NotLockOwner`, the lock stays held.
pub async fn non_owner_cannot_release_or_extend(b: &Backends) {
    let locks = &*b.locks;
    let key = "leader_forgery";
    let lease = acquire_ok(locks, key, "monitor-a", LONG_TTL).await;
    for forgery in [forged(&lease, "intruder"), forged(&lease, "monitor-a")] {
        let who = forgery.owner.clone();
        assert!(
            !must(
                format!("release by a forged lease ({who})"),
                locks.release(&forgery)
            )
            .await,
            "a forged lease ({who}, another token) released the lock"
        );
        match within(
            "extend by a forged lease",
            CALL_TIMEOUT,
            locks.extend(&forgery, LONG_TTL),
        )
        .await
        {
            Err(Error::NotLockOwner { key: k }) => {
                assert_eq!(k, key, "NotLockOwner names another key")
            }
            other => panic!(
                "extend by a forged lease ({who}) should fail with NotLockOwner, got {other:?}"
            ),
        }
        assert!(
            acquire(locks, key, "intruder", LONG_TTL).await.is_none(),
            "the lock became free after a forged lease ({who}) tried to release it"
        );
        assert_eq!(
            holder_owner(locks, key).await,
            Some(("monitor-a".to_string(), lease.fencing_token)),
            "the holder after a forged lease ({who}) tried to release and extend"
        );
    }
    assert!(
        must("release by the owner", locks.release(&lease)).await,
        "the owner's release must succeed"
    );
}

/// `holder` reports nobody for a free key, the owner, fencing token and (about) the expiry of the
/// current lease, and nobody again after the release.
pub async fn holder_reports_owner_and_token(b: &Backends) {
    let locks = &*b.locks;
    let key = "leader_holder";
    let none = must("holder of a free key", locks.holder(key)).await;
    assert!(none.is_none(), "a never-taken key has holder {none:?}");
    let lease = acquire_ok(locks, key, "monitor-holder", LONG_TTL).await;
    let held = must("holder", locks.holder(key))
        .await
        .unwrap_or_else(|| panic!("holder of {key} is None while monitor-holder holds it"));
    assert_eq!(held.owner, "monitor-holder", "holder's owner");
    assert_eq!(
        held.fencing_token, lease.fencing_token,
        "holder's fencing token"
    );
    let (low, high) = (
        lease.expires_at - chrono::Duration::seconds(1),
        lease.expires_at + chrono::Duration::seconds(2),
    );
    assert!(
        held.expires_at >= low && held.expires_at <= high,
        "holder's expires_at {} is far from the lease's {}",
        held.expires_at,
        lease.expires_at
    );
    assert!(
        held.expires_at > Utc::now(),
        "holder reports a lease that already ended"
    );
    assert!(
        must("release", locks.release(&lease)).await,
        "the owner's release must succeed"
    );
    let after = must("holder after release", locks.holder(key)).await;
    assert!(after.is_none(), "a released key still has holder {after:?}");
}

/// Lock keys outside `[A-Za-z0-9_.:-]{1,200}` are refused with `InvalidInput`.
pub async fn bad_lock_key_is_invalid_input(b: &Backends) {
    let locks = &*b.locks;
    let too_long = "k".repeat(201);
    for key in [
        "",
        "has space",
        "bad/key",
        "star*",
        "ünïcødé",
        too_long.as_str(),
    ] {
        match within(
            "acquire of a bad key",
            CALL_TIMEOUT,
            locks.acquire(key, "monitor", LONG_TTL),
        )
        .await
        {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("acquire({key:?}) should fail with InvalidInput, got {other:?}"),
        }
        match within("holder of a bad key", CALL_TIMEOUT, locks.holder(key)).await {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("holder({key:?}) should fail with InvalidInput, got {other:?}"),
        }
    }
    // The longest valid key, with every allowed kind of character.
    let longest = format!("Aa0_.:-{}", "k".repeat(193));
    acquire_ok(locks, &longest, "monitor", LONG_TTL).await;
}
