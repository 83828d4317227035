//! One writer per disk: a lease object taken with a create-if-absent PUT,
//! renewed with `If-Match` on its ETag, taken over only once expired.
//!
//! The holder stops writing as soon as it cannot prove it still holds the
//! lease: when a renewal finds the object changed (someone took over), and
//! also when renewals have failed for so long that the lease may have
//! expired in the store's eyes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Writes stop this long before the lease would expire without renewal,
/// so a takeover never overlaps a write in flight.
const SAFETY_MARGIN_DIVISOR: u32 = 4;

/// A lease this server holds.
pub(super) struct Lease {
    store: Arc<dyn ObjectStore>,
    key: Path,
    holder: String,
    duration: Duration,
    state: Mutex<Held>,
    lost: AtomicBool,
}

struct Held {
    version: UpdateVersion,
    /// Until when writes are safe (renewal time + duration − margin).
    safe_until: Instant,
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn body(holder: &str, duration: Duration) -> PutPayload {
    let expires = unix_millis(SystemTime::now() + duration);
    let value = json!({ "holder": holder, "expires_unix_ms": expires });
    PutPayload::from(value.to_string().into_bytes())
}

impl Lease {
    /// Takes the lease at `key`, or says who holds it.
    pub(super) async fn acquire(
        store: Arc<dyn ObjectStore>,
        key: Path,
        holder: String,
        duration: Duration,
        location: &str,
    ) -> Result<Arc<Self>, String> {
        let started = Instant::now();
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let version = match store.put_opts(&key, body(&holder, duration), create).await {
            Ok(result) => UpdateVersion {
                e_tag: result.e_tag,
                version: result.version,
            },
            Err(object_store::Error::AlreadyExists { .. }) => {
                let current = store
                    .get(&key)
                    .await
                    .map_err(|e| format!("{location}: cannot read the lease: {e}"))?;
                let meta = current.meta.clone();
                let bytes = current
                    .bytes()
                    .await
                    .map_err(|e| format!("{location}: cannot read the lease: {e}"))?;
                let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let other = value
                    .get("holder")
                    .and_then(Value::as_str)
                    .unwrap_or("an unknown holder")
                    .to_owned();
                let expires = value
                    .get("expires_unix_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                let now = unix_millis(SystemTime::now());
                if now < expires {
                    return Err(format!(
                        "{location} is in use by {other} (its lease expires in {:.1} s unless renewed)",
                        (expires - now) as f64 / 1000.0
                    ));
                }
                let version = UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                };
                let result = put_if_match(&*store, &key, body(&holder, duration), version)
                    .await
                    .map_err(|e| match e {
                        object_store::Error::Precondition { .. } => format!(
                            "{location}: another server took the expired lease of {other} first"
                        ),
                        e => format!("{location}: cannot take over the lease of {other}: {e}"),
                    })?;
                tracing::warn!("{location}: took over the expired lease of {other}");
                UpdateVersion {
                    e_tag: result.e_tag,
                    version: result.version,
                }
            }
            Err(e) => return Err(format!("{location}: cannot write the lease: {e}")),
        };
        Ok(Arc::new(Self {
            store,
            key,
            holder,
            duration,
            state: Mutex::new(Held {
                version,
                safe_until: started + duration - duration / SAFETY_MARGIN_DIVISOR,
            }),
            lost: AtomicBool::new(false),
        }))
    }

    /// Whether writes may go to the store now.
    pub(super) fn valid(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
            && Instant::now()
                < self
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .safe_until
    }

    /// The error writes get once the lease is gone.
    pub(super) fn lost_error(&self) -> std::io::Error {
        std::io::Error::other(format!(
            "the lease {} is lost or could not be renewed: writes refused",
            self.key
        ))
    }

    /// Renews the lease until it is lost; runs as a task.
    pub(super) async fn keep(self: Arc<Self>) {
        let period = self.duration / 3;
        loop {
            tokio::time::sleep(period).await;
            let version = self
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .version
                .clone();
            let started = Instant::now();
            let put = put_if_match(
                &*self.store,
                &self.key,
                body(&self.holder, self.duration),
                version,
            );
            match tokio::time::timeout(period, put).await {
                Ok(Ok(result)) => {
                    let mut held = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                    held.version = UpdateVersion {
                        e_tag: result.e_tag,
                        version: result.version,
                    };
                    held.safe_until =
                        started + self.duration - self.duration / SAFETY_MARGIN_DIVISOR;
                }
                Ok(Err(object_store::Error::Precondition { .. })) => {
                    self.lost.store(true, Ordering::Release);
                    tracing::error!(
                        "lease {} was taken by another server: this export no longer writes",
                        self.key
                    );
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!("lease {}: renewal failed ({error}); retrying", self.key)
                }
                Err(_) => tracing::warn!("lease {}: renewal timed out; retrying", self.key),
            }
        }
    }

    /// Gives the lease up (clean shutdown, everything stored).
    pub(super) async fn release(&self) {
        if self.valid() {
            self.lost.store(true, Ordering::Release);
            if let Err(error) = self.store.delete(&self.key).await {
                tracing::warn!("lease {}: cannot release it: {error}", self.key);
            }
        }
    }
}

/// A PUT that replaces `key` only if it is still at `version`. Ceph RGW
/// matches `If-Match` only against an ETag without its quotes: a refused
/// quoted ETag is tried once more unquoted. That cannot let a stale holder
/// through: either form matches only the object this holder wrote.
async fn put_if_match(
    store: &dyn ObjectStore,
    key: &Path,
    payload: PutPayload,
    version: UpdateVersion,
) -> object_store::Result<object_store::PutResult> {
    let put = |version: UpdateVersion| {
        store.put_opts(
            key,
            payload.clone(),
            PutOptions {
                mode: PutMode::Update(version),
                ..PutOptions::default()
            },
        )
    };
    let unquoted = version
        .e_tag
        .as_deref()
        .and_then(|tag| tag.strip_prefix('"')?.strip_suffix('"'))
        .map(str::to_owned);
    match put(version.clone()).await {
        Err(object_store::Error::Precondition { .. }) if unquoted.is_some() => {
            put(UpdateVersion {
                e_tag: unquoted,
                version: version.version,
            })
            .await
        }
        result => result,
    }
}

/// Whether the store really refuses a create-if-absent PUT over an existing
/// object and an `If-Match` PUT with a stale ETag (Garage, for one, ignores
/// both). Leaves nothing behind.
pub(super) async fn store_enforces_conditions(
    store: &dyn ObjectStore,
    probe: &Path,
) -> Result<bool, object_store::Error> {
    let create = || PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    let first = store
        .put_opts(probe, PutPayload::from_static(b"probe 1"), create())
        .await?;
    let second = store
        .put_opts(probe, PutPayload::from_static(b"probe 2"), create())
        .await;
    let create_enforced = matches!(second, Err(object_store::Error::AlreadyExists { .. }));
    let stale = UpdateVersion {
        e_tag: Some("\"0000000000000000000000000000000a\"".to_owned()),
        version: None,
    };
    let third = store
        .put_opts(
            probe,
            PutPayload::from_static(b"probe 3"),
            PutOptions {
                mode: PutMode::Update(stale),
                ..PutOptions::default()
            },
        )
        .await;
    let match_enforced = matches!(third, Err(object_store::Error::Precondition { .. }));
    let _ = first;
    store.delete(probe).await?;
    Ok(create_enforced && match_enforced)
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn second_holder_refused_until_expiry_then_takes_over() {
        runtime().block_on(async {
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            let key = Path::from("disks/vm1/lease.json");
            let lease = |holder: &str, seconds| {
                Lease::acquire(
                    Arc::clone(&store),
                    key.clone(),
                    holder.to_owned(),
                    Duration::from_secs(seconds),
                    "s3://disks/vm1",
                )
            };
            let first = lease("first:1", 1).await.expect("first lease");
            assert!(first.valid());
            let refused = lease("second:2", 1).await.err().expect("refused");
            assert!(refused.contains("in use by first:1"), "{refused}");
            assert!(!refused.contains('\n'));
            // The first holder dies (no renewal); once expired, taken over.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let second = lease("second:2", 30).await.expect("takeover");
            assert!(second.valid());
            // The first one's renewal now fails its If-Match: it stops.
            assert!(!first.valid(), "the old holder's safe window is over");
            let keep = tokio::spawn(Arc::clone(&first).keep());
            tokio::time::timeout(Duration::from_secs(5), keep)
                .await
                .expect("renewal gave up")
                .expect("task");
            assert!(first.lost.load(Ordering::Acquire));
        });
    }

    #[test]
    fn in_memory_store_enforces_conditions() {
        runtime().block_on(async {
            let store = InMemory::new();
            let probe = Path::from("disks/vm1/probe-x");
            assert!(
                store_enforces_conditions(&store, &probe)
                    .await
                    .expect("probe")
            );
            assert!(store.head(&probe).await.is_err(), "probe left behind");
        });
    }
}
