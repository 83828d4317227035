//! Disks on S3-compatible object storage (`s3://BUCKET/PREFIX`).
//!
//! The disk is cut into fixed-size objects (module `layout`); writes go to a
//! write-back cache shared by every connection of the export and are
//! uploaded in the background (module `disk`); one server at a time writes,
//! holding a lease object (module `lease`). The S3 calls run on a small
//! runtime of the export's own, so the export can be opened before the
//! server's runtime exists and outlives none of it.
//!
//! Details, guarantees and limits: `docs/OBJECT-STORAGE.md`.

mod disk;
mod layout;
mod lease;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use nbd_core::export::Capabilities;
use nbd_core::wire::ExtDescriptor;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use self::disk::Disk;
use self::lease::Lease;
use super::INLINE_BYTES;
use super::{AsyncBackend, Backend, StorageFuture, ZeroFlags, try_fill_appended};

/// Default object size (`object-size=`).
pub const DEFAULT_OBJECT_SIZE: u64 = 1 << 20;
/// Default cache bound (`cache=`).
pub const DEFAULT_CACHE: u64 = 256 << 20;
/// Default lease duration (`lease=`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Longest any request waits on the store before its reply is an error
/// (`EIO`): store calls time out after 10 s and are retried within 15 s,
/// and one request may need a few in a row (room in the cache, a
/// read-modify-write, the upload).
pub const REQUEST_BOUND: Duration = Duration::from_secs(60);

/// Most objects one disk may have (the existence map is a byte each).
const MAX_OBJECTS: u64 = 1 << 26;

/// An `s3://BUCKET/PREFIX` export and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix of the disk's objects (may be empty).
    pub prefix: String,
    /// `size=`: needed to create the disk; checked against its manifest.
    pub size: Option<u64>,
    /// `object-size=`: for a new disk; checked against the manifest.
    pub object_size: Option<u64>,
    /// `cache=`: bound of the write-back and read cache.
    pub cache: u64,
    /// `endpoint=`: overrides `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// `region=`: overrides `AWS_REGION`.
    pub region: Option<String>,
    /// `lease=SECONDS`: how long the writer's lease lasts unrenewed.
    pub lease: Duration,
    /// `no-fencing`: write even on a store that ignores conditional
    /// writes, without a lease (the user vouches for a single writer).
    pub no_fencing: bool,
}

impl S3Options {
    /// Options for `s3://BUCKET/PREFIX`, given as `BUCKET/PREFIX`.
    pub fn new(location: &str) -> Result<Self, String> {
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(format!("`s3://{location}`: no bucket name"));
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            size: None,
            object_size: None,
            cache: DEFAULT_CACHE,
            endpoint: None,
            region: None,
            lease: DEFAULT_LEASE,
            no_fencing: false,
        })
    }

    /// Takes one export option if it is an S3 one; `Ok(false)` when not.
    pub fn option(&mut self, option: &str) -> Result<bool, String> {
        let size = |text: &str| crate::size::parse_size(text).map_err(|e| e.to_string());
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        match key {
            "size" => self.size = Some(size(value)?),
            "object-size" => {
                let object_size = size(value)?;
                layout::check_object_size(object_size)?;
                self.object_size = Some(object_size);
            }
            "cache" => self.cache = size(value)?,
            "endpoint" if !value.is_empty() => self.endpoint = Some(value.to_owned()),
            "region" if !value.is_empty() => self.region = Some(value.to_owned()),
            "lease" => {
                let seconds: u64 = value
                    .parse()
                    .ok()
                    .filter(|&s| (3..=3600).contains(&s))
                    .ok_or_else(|| format!("`{option}`: expected whole seconds from 3 to 3600"))?;
                self.lease = Duration::from_secs(seconds);
            }
            "no-fencing" if value.is_empty() => self.no_fencing = true,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `s3://BUCKET/PREFIX`, for messages.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// The store client, from the standard `AWS_*` variables and the
    /// options. Path-style requests (SeaweedFS, Ceph, MinIO need them).
    fn store(&self) -> Result<Arc<dyn ObjectStore>, String> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(Duration::from_secs(10))
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_allow_http(true),
            )
            .with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..object_store::RetryConfig::default()
            });
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        // The builder's own errors name settings, never secret values.
        let store = builder
            .build()
            .map_err(|e| format!("{}: {e}", self.location()))?;
        Ok(Arc::new(store))
    }
}

/// An export whose blocks are objects in an S3-compatible store.
#[derive(Debug)]
pub struct S3Backend {
    shared: Arc<Opened>,
}

/// An open disk, shared by the export and its requests in flight.
struct Opened {
    disk: Arc<Disk>,
    lease: Option<Arc<Lease>>,
    read_only: bool,
    location: String,
    /// The export's own runtime for S3 calls and background work; shut
    /// down (never dropped in place, which a runtime thread cannot do)
    /// when the backend goes.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("location", &self.location)
            .field("size", &self.disk.size())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Opens (or creates, with `size=`) the disk. The error is one line.
    pub fn open(options: &S3Options, read_only: bool) -> Result<Self, String> {
        return_large_buffers_to_the_system();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nbd-s3")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the S3 runtime: {e}"))?;
        let store = options.store()?;
        let handle = runtime.handle().clone();
        let opened = std::thread::scope(|scope| {
            // A runtime cannot be entered from a runtime thread: open from
            // a thread of its own, wherever the caller is.
            scope
                .spawn(|| runtime.block_on(Self::open_disk(options, store, read_only)))
                .join()
                .unwrap_or_else(|_| Err("opening the S3 disk panicked".to_owned()))
        })?;
        let (disk, dirtied, lease) = opened;
        handle.spawn(Arc::clone(&disk).upload_in_background(dirtied));
        if let Some(lease) = &lease {
            handle.spawn(Arc::clone(lease).keep());
        }
        Ok(Self {
            shared: Arc::new(Opened {
                disk,
                lease,
                read_only,
                location: options.location(),
                runtime: Some(runtime),
                handle,
            }),
        })
    }

    #[allow(clippy::type_complexity)]
    async fn open_disk(
        options: &S3Options,
        store: Arc<dyn ObjectStore>,
        read_only: bool,
    ) -> Result<
        (
            Arc<Disk>,
            tokio::sync::mpsc::UnboundedReceiver<u64>,
            Option<Arc<Lease>>,
        ),
        String,
    > {
        let location = options.location();
        let prefix = Path::from(options.prefix.as_str());
        let lease = if read_only {
            None
        } else {
            let probe = prefix.clone().join(format!("probe-{}", layout::fresh_id()));
            let enforced = lease::store_enforces_conditions(&*store, &probe)
                .await
                .map_err(|e| format!("{location}: cannot check conditional writes: {e}"))?;
            match (enforced, options.no_fencing) {
                (true, false) => {
                    let holder = format!(
                        "{}:{} ({})",
                        hostname(),
                        std::process::id(),
                        layout::fresh_id()
                    );
                    Some(
                        Lease::acquire(
                            Arc::clone(&store),
                            layout::lease_key(&prefix),
                            holder,
                            options.lease,
                            &location,
                        )
                        .await?,
                    )
                }
                (false, false) => {
                    return Err(format!(
                        "{location}: the store ignores conditional writes, so two servers could write this disk at once; serve it with ,ro, or add ,no-fencing if you are sure only one server writes"
                    ));
                }
                (_, true) => {
                    tracing::warn!(
                        "{location}: no-fencing: no lease taken; a second writer would corrupt the disk"
                    );
                    None
                }
            }
        };
        // After the lease: a refused server creates nothing. A failure
        // from here gives the lease back, so a corrected retry may open.
        let found = async {
            let manifest = manifest(options, &*store, &prefix, read_only).await?;
            let objects = manifest.size.div_ceil(manifest.object_size);
            if objects > MAX_OBJECTS {
                return Err(format!(
                    "{location}: {objects} objects is more than the {MAX_OBJECTS} a disk may have: use a larger object-size="
                ));
            }
            let existing = list_objects(&*store, &prefix)
                .await
                .map_err(|e| format!("{location}: cannot list the disk's objects: {e}"))?;
            Ok((manifest, existing))
        };
        let (manifest, existing) = match found.await {
            Ok(found) => found,
            Err(error) => {
                if let Some(lease) = &lease {
                    lease.release().await;
                }
                return Err(error);
            }
        };
        tracing::info!(
            "{location}: {} bytes in objects of {} bytes, {} stored, disk {}",
            manifest.size,
            manifest.object_size,
            existing.len(),
            manifest.uuid
        );
        let (disk, dirtied) = Disk::new(
            store,
            prefix,
            manifest.size,
            manifest.object_size,
            options.cache,
            &existing,
            lease.clone(),
        );
        Ok((disk, dirtied, lease))
    }
}

impl Opened {
    /// Runs `work` on the export's runtime; the future resolves wherever
    /// it is awaited. A request not done within [`REQUEST_BOUND`] (the
    /// store down or stalled) is dropped and answered with `on_error`
    /// (`EIO` for the client): its data stays dirty, nothing half-done is
    /// acknowledged.
    fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
        on_error: impl FnOnce(io::Error) -> T + Send + 'static,
    ) -> StorageFuture<T> {
        let task = self.handle.spawn(tokio::time::timeout(REQUEST_BOUND, work));
        Box::pin(async move {
            match task.await {
                Ok(Ok(done)) => done,
                Ok(Err(_elapsed)) => on_error(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "object store: request not done within {} s",
                        REQUEST_BOUND.as_secs()
                    ),
                )),
                Err(_) => on_error(panicked()),
            }
        })
    }

    /// Waits for `work` on the export's runtime from a thread that may
    /// block (the blocking calls of [`Backend`]).
    fn wait<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = sender.send(work.await);
        });
        receiver.recv().ok()
    }

    fn refuse_if_read_only(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::ErrorKind::ReadOnlyFilesystem.into())
        } else {
            Ok(())
        }
    }
}

/// Makes glibc's allocator serve buffers of 128 KiB and more (objects,
/// fetched bodies) with `mmap`, so each is given back to the system when
/// freed. By default glibc raises that threshold as such buffers are freed
/// and then keeps them in its arenas, one set per thread, and the server's
/// RSS grew to about twice `cache=`.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 128 << 10;
        // SAFETY: mallopt(3) only sets allocator parameters, under the
        // allocator's own lock; any thread may call it at any time.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        }
    }
}

fn panicked() -> io::Error {
    io::Error::other("S3 task panicked")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

/// Reads the manifest, or creates it (only if absent) when `size=` is
/// given; a mismatch with the options is an error.
async fn manifest(
    options: &S3Options,
    store: &dyn ObjectStore,
    prefix: &Path,
    read_only: bool,
) -> Result<layout::Manifest, String> {
    let location = options.location();
    let key = layout::manifest_key(prefix);
    let read = async || -> Result<Option<layout::Manifest>, String> {
        match store.get(&key).await {
            Ok(result) => {
                let bytes = result
                    .bytes()
                    .await
                    .map_err(|e| format!("{location}: cannot read the manifest: {e}"))?;
                layout::Manifest::decode(&bytes)
                    .map(Some)
                    .map_err(|e| format!("{location}: {e}"))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(format!("{location}: cannot read the manifest: {e}")),
        }
    };
    let manifest = match read().await? {
        Some(manifest) => manifest,
        None => {
            let Some(size) = options.size else {
                return Err(format!(
                    "{location}: no disk there (no manifest.json); add ,size=SIZE to create one"
                ));
            };
            if read_only {
                return Err(format!(
                    "{location}: no disk there, and a read-only export does not create one"
                ));
            }
            if size == 0 {
                return Err(format!("{location}: size=0"));
            }
            let created = layout::Manifest {
                size,
                object_size: options.object_size.unwrap_or(DEFAULT_OBJECT_SIZE),
                uuid: layout::fresh_id(),
            };
            let create = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match store
                .put_opts(&key, PutPayload::from(created.encode()), create)
                .await
            {
                Ok(_) => {
                    tracing::info!("{location}: created a disk of {size} bytes");
                    created
                }
                // Another server created it meanwhile: use theirs.
                Err(object_store::Error::AlreadyExists { .. }) => read()
                    .await?
                    .ok_or_else(|| format!("{location}: the manifest vanished while opening"))?,
                Err(e) => return Err(format!("{location}: cannot create the manifest: {e}")),
            }
        }
    };
    if let Some(size) = options.size
        && size != manifest.size
    {
        return Err(format!(
            "{location}: size={size} but the disk's manifest says {} bytes",
            manifest.size
        ));
    }
    if let Some(object_size) = options.object_size
        && object_size != manifest.object_size
    {
        return Err(format!(
            "{location}: object-size={object_size} but the disk's manifest says {}",
            manifest.object_size
        ));
    }
    Ok(manifest)
}

/// Indices of the data objects in the store, by one LIST.
async fn list_objects(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<Vec<u64>, object_store::Error> {
    use futures_util::StreamExt;
    let folder = layout::data_folder(prefix);
    let mut listing = store.list(Some(&folder));
    let mut indices = Vec::new();
    while let Some(meta) = listing.next().await {
        if let Some(index) = meta?.location.filename().and_then(layout::data_index) {
            indices.push(index);
        }
    }
    Ok(indices)
}

impl Drop for Opened {
    fn drop(&mut self) {
        if !self.read_only {
            // Store what is still dirty and give the lease up; bounded, so
            // a dead store cannot hold the exit forever.
            let disk = Arc::clone(&self.disk);
            let lease = self.lease.clone();
            let location = self.location.clone();
            let (sender, receiver) = std::sync::mpsc::sync_channel(1);
            self.handle.spawn(async move {
                let stored = disk.flush().await;
                match &stored {
                    Ok(()) => {
                        if let Some(lease) = lease {
                            lease.release().await;
                        }
                    }
                    Err(error) => tracing::error!(
                        "{location}: data not stored at shutdown ({error}); the lease is left to expire"
                    ),
                }
                let _ = sender.send(());
            });
            let _ = receiver.recv_timeout(Duration::from_secs(60));
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl AsyncBackend for Opened {
    fn read(&self, mut buffer: Vec<u8>, offset: u64) -> StorageFuture<(Vec<u8>, io::Result<()>)> {
        let disk = Arc::clone(&self.disk);
        let length = buffer.len();
        if disk.read_cached(&mut buffer, offset) {
            // Read-ahead's task must run on the export's runtime: the
            // caller may be on another one, or on none.
            let _export_runtime = self.handle.enter();
            disk.read_ahead(offset, length as u64);
            return Box::pin(async move { (buffer, Ok(())) });
        }
        self.spawn(
            async move {
                disk.read_ahead(offset, length as u64);
                let result = disk.read(&mut buffer, offset).await;
                (buffer, result)
            },
            move |error| (vec![0; length], Err(error)),
        )
    }

    fn write(&self, data: Vec<u8>, offset: u64) -> StorageFuture<(Vec<u8>, io::Result<()>)> {
        if let Err(error) = self.refuse_if_read_only() {
            return Box::pin(async move { (data, Err(error)) });
        }
        let disk = Arc::clone(&self.disk);
        if disk.write_cached(&data, offset) {
            return Box::pin(async move { (data, Ok(())) });
        }
        let length = data.len();
        self.spawn(
            async move {
                let result = disk.write(&data, offset).await;
                (data, result)
            },
            move |error| (vec![0; length], Err(error)),
        )
    }

    fn flush(&self) -> StorageFuture<io::Result<()>> {
        let disk = Arc::clone(&self.disk);
        self.spawn(async move { disk.flush().await }, Err)
    }

    fn flush_range(&self, offset: u64, length: u64) -> StorageFuture<io::Result<()>> {
        let disk = Arc::clone(&self.disk);
        self.spawn(async move { disk.flush_range(offset, length).await }, Err)
    }

    fn trim(&self, offset: u64, length: u64) -> StorageFuture<io::Result<()>> {
        self.write_zeroes(offset, length, ZeroFlags::default())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> StorageFuture<io::Result<()>> {
        if let Err(error) = self.refuse_if_read_only() {
            return Box::pin(async move { Err(error) });
        }
        let disk = Arc::clone(&self.disk);
        self.spawn(
            async move { disk.write_zeroes(offset, length, flags).await },
            Err,
        )
    }

    fn cache(&self, offset: u64, length: u64) -> StorageFuture<io::Result<()>> {
        let disk = Arc::clone(&self.disk);
        self.spawn(async move { disk.prefetch(offset, length).await }, Err)
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        mut extents: Vec<ExtDescriptor>,
    ) -> StorageFuture<(Vec<ExtDescriptor>, io::Result<()>)> {
        let disk = Arc::clone(&self.disk);
        self.spawn(
            async move {
                let result = disk.block_status(offset, length, &mut extents).await;
                (extents, result)
            },
            |error| (Vec::new(), Err(error)),
        )
    }
}

/// The blocking calls, for callers without a runtime of their own (a
/// fault-injecting wrapper, tools); the server uses [`AsyncBackend`].
impl Backend for S3Backend {
    fn size(&self) -> u64 {
        self.shared.disk.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            resize: false,
            multi_conn: true,
            block_status: true,
            rotational: false,
        }
    }

    fn async_form(&self) -> Option<Arc<dyn AsyncBackend>> {
        Some(Arc::clone(&self.shared) as Arc<dyn AsyncBackend>)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (data, result) = self
            .shared
            .wait(AsyncBackend::read(
                &*self.shared,
                vec![0; buf.len()],
                offset,
            ))
            .ok_or_else(panicked)?;
        buf.copy_from_slice(&data);
        result
    }

    /// A read of objects all cached (or absent: zeroes), none locked by a
    /// request in flight, is a copy: done on the connection's thread, it
    /// saves a task and a channel hop, which at QD1 cost more than the
    /// copy. Anything that would wait (a fetch, a lock held by a write)
    /// goes the asynchronous way.
    fn try_read_now(
        &self,
        buffer: &mut Vec<u8>,
        offset: u64,
        length: usize,
    ) -> Option<io::Result<()>> {
        let disk = &self.shared.disk;
        let filled = try_fill_appended(buffer, length, |room| {
            disk.read_cached(room, offset).then_some(Ok(()))
        })?;
        // Read-ahead's task must run on the export's runtime.
        let _export_runtime = self.shared.handle.enter();
        disk.read_ahead(offset, length as u64);
        Some(filled)
    }

    /// A write into one object that is cached and already dirty (holding
    /// its cache room) is a copy too: random writes into hot objects never
    /// leave the connection's thread.
    fn try_write_now(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        if self.shared.read_only
            || data.len() > INLINE_BYTES
            || !self.shared.disk.write_cached(data, offset)
        {
            return None;
        }
        Some(Ok(()))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.shared
            .wait(AsyncBackend::write(&*self.shared, data.to_vec(), offset))
            .ok_or_else(panicked)?
            .1
    }

    fn flush(&self) -> io::Result<()> {
        self.shared
            .wait(AsyncBackend::flush(&*self.shared))
            .ok_or_else(panicked)?
    }

    fn flush_range(&self, offset: u64, length: u64) -> io::Result<()> {
        self.shared
            .wait(AsyncBackend::flush_range(&*self.shared, offset, length))
            .ok_or_else(panicked)?
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.shared
            .wait(AsyncBackend::trim(&*self.shared, offset, length))
            .ok_or_else(panicked)?
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.shared
            .wait(AsyncBackend::write_zeroes(
                &*self.shared,
                offset,
                length,
                flags,
            ))
            .ok_or_else(panicked)?
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.shared
            .wait(AsyncBackend::cache(&*self.shared, offset, length))
            .ok_or_else(panicked)?
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        let (found, result) = self
            .shared
            .wait(AsyncBackend::block_status(
                &*self.shared,
                offset,
                length,
                Vec::new(),
            ))
            .ok_or_else(panicked)?;
        extents.extend(found);
        result
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutResult,
    };

    use super::*;

    /// A store that ignores conditional writes, as Garage does.
    #[derive(Debug, Default)]
    struct Unconditional(InMemory);

    impl std::fmt::Display for Unconditional {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Unconditional")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Unconditional {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            _: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.0.put(location, payload).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.0.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            self.0.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.0.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
    }

    #[test]
    fn store_ignoring_conditional_writes_refused_unless_no_fencing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store: Arc<dyn ObjectStore> = Arc::new(Unconditional::default());
        let mut options = S3Options::new("disks/vm1").expect("options");
        assert!(options.option("size=1M").expect("size"));
        let refused = rt
            .block_on(S3Backend::open_disk(&options, Arc::clone(&store), false))
            .err()
            .expect("refused");
        assert!(
            refused.contains("ignores conditional writes") && refused.contains("no-fencing"),
            "{refused}"
        );
        assert!(!refused.contains('\n'));
        let manifest = layout::manifest_key(&Path::from("disks/vm1"));
        assert!(
            rt.block_on(store.head(&manifest)).is_err(),
            "a refused server created the disk"
        );
        // no-fencing is the user's word; read-only needs no lease.
        assert!(options.option("no-fencing").expect("no-fencing"));
        let (_, _, lease) = rt
            .block_on(S3Backend::open_disk(&options, Arc::clone(&store), false))
            .expect("opened with no-fencing");
        assert!(lease.is_none());
        options.no_fencing = false;
        assert!(
            rt.block_on(S3Backend::open_disk(&options, store, true))
                .is_ok()
        );
    }

    #[test]
    fn spec_options() {
        let mut options = S3Options::new("disks/a/b/").expect("options");
        assert_eq!(
            (options.bucket.as_str(), options.prefix.as_str()),
            ("disks", "a/b")
        );
        assert!(options.option("object-size=4M").expect("object-size"));
        assert!(options.option("object-size=3M").is_err());
        assert!(options.option("lease=2").is_err());
        assert!(options.option("lease=10").expect("lease"));
        assert_eq!(options.lease, Duration::from_secs(10));
        assert!(!options.option("fail=read").expect("not ours"));
        assert!(S3Options::new("/x").is_err());
    }
}
