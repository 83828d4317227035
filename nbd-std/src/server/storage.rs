//! Storage work for one request, run inline or on the blocking pool, and
//! its outcome.

use std::io;
use std::sync::Arc;

use nbd_core::server::RequestId;
use nbd_core::wire::ExtDescriptor;

use crate::backend::{AsyncBackend, Backend, ZeroFlags};

/// One storage operation.
#[derive(Debug)]
pub(super) enum Job {
    /// Reads `length` bytes into `buffer`, empty with room for them.
    Read {
        id: RequestId,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    },
    Write {
        id: RequestId,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush {
        id: RequestId,
    },
    /// Makes a write stored in pieces durable (FUA).
    Durable {
        id: RequestId,
        offset: u64,
        length: u64,
    },
    Trim {
        id: RequestId,
        offset: u64,
        length: u64,
        fua: bool,
    },
    Zero {
        id: RequestId,
        offset: u64,
        length: u64,
        fua: bool,
        flags: ZeroFlags,
    },
    Cache {
        id: RequestId,
        offset: u64,
        length: u64,
    },
    BlockStatus {
        id: RequestId,
        offset: u64,
        length: u64,
        extents: Vec<ExtDescriptor>,
    },
    Resize {
        id: RequestId,
        size: u64,
    },
}

/// What came of a job. Buffers travel back for reuse.
#[derive(Debug)]
pub(super) enum Done {
    /// `buffer` holds the `length` bytes read when `result` is `Ok`.
    Read {
        id: RequestId,
        length: usize,
        buffer: Vec<u8>,
        result: io::Result<()>,
    },
    Write {
        id: RequestId,
        data: Vec<u8>,
        result: io::Result<()>,
    },
    Other {
        id: RequestId,
        result: io::Result<()>,
    },
    BlockStatus {
        id: RequestId,
        extents: Vec<ExtDescriptor>,
        result: io::Result<()>,
    },
}

impl Job {
    /// Carries the job out.
    pub(super) fn run(self, backend: &dyn Backend) -> Done {
        let durable = |fua: bool, offset: u64, length: u64| {
            if fua {
                backend.flush_range(offset, length)
            } else {
                Ok(())
            }
        };
        match self {
            Self::Read {
                id,
                offset,
                length,
                mut buffer,
            } => {
                let result = backend.read_appended(&mut buffer, offset, length);
                Done::Read {
                    id,
                    length,
                    buffer,
                    result,
                }
            }
            Self::Write {
                id,
                offset,
                data,
                fua,
            } => {
                let result = backend
                    .write_at(&data, offset)
                    .and_then(|()| durable(fua, offset, data.len() as u64));
                Done::Write { id, data, result }
            }
            Self::Durable { id, offset, length } => Done::Other {
                id,
                result: backend.flush_range(offset, length),
            },
            Self::Flush { id } => Done::Other {
                id,
                result: backend.flush(),
            },
            Self::Trim {
                id,
                offset,
                length,
                fua,
            } => Done::Other {
                id,
                result: backend
                    .trim(offset, length)
                    .and_then(|()| durable(fua, offset, length)),
            },
            Self::Zero {
                id,
                offset,
                length,
                fua,
                flags,
            } => Done::Other {
                id,
                result: backend
                    .write_zeroes(offset, length, flags)
                    .and_then(|()| durable(fua, offset, length)),
            },
            Self::Cache { id, offset, length } => Done::Other {
                id,
                result: backend.cache(offset, length),
            },
            Self::BlockStatus {
                id,
                offset,
                length,
                mut extents,
            } => {
                extents.clear();
                let result = backend.block_status(offset, length, &mut extents);
                Done::BlockStatus {
                    id,
                    extents,
                    result,
                }
            }
            Self::Resize { id, size } => Done::Other {
                id,
                result: backend.resize(size),
            },
        }
    }
}

impl Job {
    /// Carries the job out on storage with an asynchronous form: the
    /// returned future owns everything, so it runs as a task of its own.
    pub(super) async fn run_async(self, backend: Arc<dyn AsyncBackend>) -> Done {
        let durable = async |fua: bool, offset: u64, length: u64| {
            if fua {
                backend.flush_range(offset, length).await
            } else {
                Ok(())
            }
        };
        match self {
            Self::Read {
                id,
                offset,
                length,
                mut buffer,
            } => {
                buffer.resize(length, 0);
                let (buffer, result) = backend.read(buffer, offset).await;
                Done::Read {
                    id,
                    length,
                    buffer,
                    result,
                }
            }
            Self::Write {
                id,
                offset,
                data,
                fua,
            } => {
                let length = data.len() as u64;
                let (data, mut result) = backend.write(data, offset).await;
                if result.is_ok() {
                    result = durable(fua, offset, length).await;
                }
                Done::Write { id, data, result }
            }
            Self::Durable { id, offset, length } => Done::Other {
                id,
                result: backend.flush_range(offset, length).await,
            },
            Self::Flush { id } => Done::Other {
                id,
                result: backend.flush().await,
            },
            Self::Trim {
                id,
                offset,
                length,
                fua,
            } => {
                let mut result = backend.trim(offset, length).await;
                if result.is_ok() {
                    result = durable(fua, offset, length).await;
                }
                Done::Other { id, result }
            }
            Self::Zero {
                id,
                offset,
                length,
                fua,
                flags,
            } => {
                let mut result = backend.write_zeroes(offset, length, flags).await;
                if result.is_ok() {
                    result = durable(fua, offset, length).await;
                }
                Done::Other { id, result }
            }
            Self::Cache { id, offset, length } => Done::Other {
                id,
                result: backend.cache(offset, length).await,
            },
            Self::BlockStatus {
                id,
                offset,
                length,
                mut extents,
            } => {
                extents.clear();
                let (extents, result) = backend.block_status(offset, length, extents).await;
                Done::BlockStatus {
                    id,
                    extents,
                    result,
                }
            }
            Self::Resize { id, .. } => Done::Other {
                id,
                result: Err(io::ErrorKind::Unsupported.into()),
            },
        }
    }
}

impl Job {
    /// Carries the job out at once when the backend can without blocking
    /// (its `try_*_now`); gives it back for the pool otherwise.
    pub(super) fn run_now(self, backend: &dyn Backend) -> Result<Done, Self> {
        match self {
            Self::Read {
                id,
                offset,
                length,
                mut buffer,
            } => match backend.try_read_now(&mut buffer, offset, length) {
                Some(result) => Ok(Done::Read {
                    id,
                    length,
                    buffer,
                    result,
                }),
                None => Err(Self::Read {
                    id,
                    offset,
                    length,
                    buffer,
                }),
            },
            Self::Write {
                id,
                offset,
                data,
                fua: false,
            } => match backend.try_write_now(&data, offset) {
                Some(result) => Ok(Done::Write { id, data, result }),
                None => Err(Self::Write {
                    id,
                    offset,
                    data,
                    fua: false,
                }),
            },
            Self::Durable { id, offset, length } => {
                match backend.try_flush_now(Some((offset, length))) {
                    Some(result) => Ok(Done::Other { id, result }),
                    None => Err(Self::Durable { id, offset, length }),
                }
            }
            Self::Flush { id } => match backend.try_flush_now(None) {
                Some(result) => Ok(Done::Other { id, result }),
                None => Err(Self::Flush { id }),
            },
            other => Err(other),
        }
    }
}

impl Done {
    pub(super) fn id(&self) -> RequestId {
        match self {
            Self::Read { id, .. }
            | Self::Write { id, .. }
            | Self::Other { id, .. }
            | Self::BlockStatus { id, .. } => *id,
        }
    }

    pub(super) fn result(&self) -> &io::Result<()> {
        match self {
            Self::Read { result, .. }
            | Self::Write { result, .. }
            | Self::Other { result, .. }
            | Self::BlockStatus { result, .. } => result,
        }
    }
}
