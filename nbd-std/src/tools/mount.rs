//! `nbd-std mount URI FILE`: the export as one regular file, through FUSE
//! (the `fuser` crate, which mounts with `mount(2)` as root and through
//! `fusermount3` otherwise).
//!
//! The filesystem's root is the file itself, mounted onto a regular file
//! (created if missing). Reads and writes go to the server (the kernel's
//! page cache in front, without writeback caching, so every write reaches
//! the server before `write(2)` returns); `fsync` sends `NBD_CMD_FLUSH`;
//! `fallocate` with `PUNCH_HOLE` or `ZERO_RANGE` sends
//! `NBD_CMD_WRITE_ZEROES`. The size is the export's and cannot change.
//! SIGINT or SIGTERM unmounts; so does `fusermount3 -u FILE` (or `umount`),
//! after which the command flushes, disconnects and exits 0.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};
use nbd_core::wire::ErrorCode;
use tokio::runtime::Handle;
use tracing::{info, warn};

use crate::client::{self, Client, NbdUri, ZeroOptions};

/// How long the kernel may cache the file's attributes.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// `fallocate` mode bits (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// Why mounting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// Connecting to the export failed.
    #[error("{uri}: {error}")]
    Connect {
        /// The export.
        uri: String,
        /// Why.
        #[source]
        error: client::Error,
    },
    /// The mount point is unusable.
    #[error("{path}: {error}")]
    MountPoint {
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        error: io::Error,
    },
    /// FUSE refused (no `/dev/fuse`, no permission, `fusermount3` missing).
    #[error("cannot mount on {path}: {error} (FUSE needs /dev/fuse, and root or fusermount3)")]
    Fuse {
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        error: io::Error,
    },
    /// Unmounting or the end of the session failed.
    #[error("unmounting {path}: {error}")]
    Unmount {
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        error: io::Error,
    },
}

/// How to mount.
#[derive(Clone, Copy, Debug)]
pub struct MountOptions {
    /// Connections, when the server advertises multi-conn.
    pub connections: usize,
    /// Mount read-only even if the export is writable.
    pub read_only: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            connections: 4,
            read_only: false,
        }
    }
}

/// The filesystem: one regular file, inode 1.
struct ExportFile {
    client: Client,
    runtime: Handle,
    attr: FileAttr,
    read_only: bool,
}

/// The errno for a client error.
fn errno(error: &client::Error) -> Errno {
    match error {
        client::Error::Server { code, .. } => match code {
            ErrorCode::Perm => Errno::EPERM,
            ErrorCode::Io => Errno::EIO,
            ErrorCode::NoMemory => Errno::ENOMEM,
            ErrorCode::Invalid => Errno::EINVAL,
            ErrorCode::NoSpace => Errno::ENOSPC,
            ErrorCode::Overflow => Errno::EOVERFLOW,
            ErrorCode::NotSupported => Errno::EOPNOTSUPP,
            ErrorCode::Shutdown => Errno::ESHUTDOWN,
        },
        client::Error::ReadOnly(_) => Errno::EROFS,
        client::Error::Unsupported(_) => Errno::EOPNOTSUPP,
        client::Error::OutOfRange { .. } => Errno::ENOSPC,
        client::Error::Misaligned { .. } => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

impl ExportFile {
    fn size(&self) -> u64 {
        self.attr.size
    }

    fn is_root(ino: INodeNo) -> bool {
        ino == INodeNo::ROOT
    }
}

impl Filesystem for ExportFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The kernel caps a FUSE write at 1 MiB anyway.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        // The root is a file: it has no entries.
        reply.error(Errno::ENOTDIR);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if Self::is_root(ino) {
            reply.attr(&ATTR_TTL, &self.attr);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if !Self::is_root(ino) {
            return reply.error(Errno::ENOENT);
        }
        // The export's size is fixed; other attributes are not stored.
        match size {
            Some(size) if size != self.size() => reply.error(Errno::EINVAL),
            _ => reply.attr(&ATTR_TTL, &self.attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !Self::is_root(ino) {
            return reply.error(Errno::ENOENT);
        }
        let writing = flags.acc_mode() != fuser::OpenAccMode::O_RDONLY;
        if writing && self.read_only {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let length = u64::from(size).min(self.size().saturating_sub(offset));
        if length == 0 {
            return reply.data(&[]);
        }
        let client = self.client.clone();
        self.runtime.spawn(async move {
            match client.read_owned(vec![0u8; length as usize], offset).await {
                Ok(buf) => reply.data(&buf),
                Err(error) => {
                    warn!("read of {length} bytes at {offset}: {error}");
                    reply.error(errno(&error));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let length = (data.len() as u64).min(self.size().saturating_sub(offset));
        if length == 0 {
            return reply.error(Errno::ENOSPC);
        }
        let data = data[..length as usize].to_vec();
        let client = self.client.clone();
        self.runtime.spawn(async move {
            match client.write_owned(data, offset).await {
                Ok(_) => reply.written(length as u32),
                Err(error) => {
                    warn!("write of {length} bytes at {offset}: {error}");
                    reply.error(errno(&error));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): not a durability point (fsync is).
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if !self.client.info().export.can_flush() {
            return reply.ok();
        }
        let client = self.client.clone();
        self.runtime.spawn(async move {
            match client.flush().await {
                Ok(()) => reply.ok(),
                Err(error) => {
                    warn!("flush: {error}");
                    reply.error(errno(&error));
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let end = offset.saturating_add(length);
        if end > self.size() {
            // Nothing can grow the export.
            return reply.error(if mode & FALLOC_FL_KEEP_SIZE != 0 {
                Errno::EINVAL
            } else {
                Errno::ENOSPC
            });
        }
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0 {
            // Plain allocation: every byte of the export already exists.
            return reply.ok();
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let client = self.client.clone();
        self.runtime.spawn(async move {
            match client.zero(offset, length, ZeroOptions::default()).await {
                Ok(()) => reply.ok(),
                Err(error) => {
                    warn!("fallocate({mode:#x}) of {length} bytes at {offset}: {error}");
                    reply.error(errno(&error));
                }
            }
        });
    }
}

/// Creates the mount point if missing; it must be a regular file.
fn prepare_mount_point(path: &Path) -> Result<std::fs::Metadata, MountError> {
    let failed = |error| MountError::MountPoint {
        path: path.display().to_string(),
        error,
    };
    let file = OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .open(path)
        .map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    if !meta.is_file() {
        return Err(failed(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the mount point must be a regular file",
        )));
    }
    Ok(meta)
}

/// How the mount ended.
enum Ending {
    Signal,
    Unmounted,
}

/// Mounts the export at `uri` on `mountpoint` and serves it until a
/// signal or an unmount; then flushes and disconnects.
pub async fn mount(
    uri: &NbdUri,
    mountpoint: &Path,
    options: MountOptions,
) -> Result<(), MountError> {
    let client = Client::connect_uri(uri, options.connections)
        .await
        .map_err(|error| MountError::Connect {
            uri: uri.to_string(),
            error,
        })?;
    let meta = prepare_mount_point(mountpoint)?;
    let details = client.info();
    let read_only = options.read_only || details.export.is_read_only();
    let size = client.size();
    let now = SystemTime::now();
    let attr = FileAttr {
        ino: INodeNo::ROOT,
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: FileType::RegularFile,
        perm: if read_only { 0o444 } else { 0o644 },
        nlink: 1,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        flags: 0,
        blksize: details.export.block_sizes.preferred.max(512),
    };
    let filesystem = ExportFile {
        client: client.clone(),
        runtime: Handle::current(),
        attr,
        read_only,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(uri.to_string()),
        MountOption::Subtype("nbd".to_owned()),
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.n_threads = Some(1);
    let path: PathBuf = mountpoint.to_owned();
    let shown = path.display().to_string();
    let session =
        tokio::task::spawn_blocking(move || fuser::spawn_mount(filesystem, &path, &config))
            .await
            .map_err(|e| MountError::Fuse {
                path: shown.clone(),
                error: io::Error::other(e),
            })?
            .map_err(|error| MountError::Fuse {
                path: shown.clone(),
                error,
            })?;
    info!("{uri} ({size} bytes) mounted on {shown}");
    let ending = wait(&session).await;
    let unmounted = tokio::task::spawn_blocking(move || match ending {
        Ending::Signal => session.umount_and_join(),
        Ending::Unmounted => session.join(),
    })
    .await
    .map_err(|e| MountError::Unmount {
        path: shown.clone(),
        error: io::Error::other(e),
    })?;
    if let Err(error) = unmounted {
        return Err(MountError::Unmount { path: shown, error });
    }
    info!("{shown} unmounted");
    if details.export.can_flush() && !read_only {
        client.flush().await.map_err(|error| MountError::Connect {
            uri: uri.to_string(),
            error,
        })?;
    }
    client
        .disconnect()
        .await
        .map_err(|error| MountError::Connect {
            uri: uri.to_string(),
            error,
        })
}

/// Waits for SIGINT/SIGTERM or the end of the FUSE session.
async fn wait(session: &fuser::BackgroundSession) -> Ending {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            Some(_) = async { interrupt.as_mut()?.recv().await } => return Ending::Signal,
            Some(_) = async { terminate.as_mut()?.recv().await } => return Ending::Signal,
            _ = poll.tick() => {
                if session.guard.is_finished() {
                    return Ending::Unmounted;
                }
            }
        }
    }
}
