//! Replay of the write log at open (see `log`).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;

use super::Disk;
use crate::backend::s3::log::{Position, Record, decode_segment, read_segment};

impl Disk {
    /// Applies the log segments in the store (`segments`, oldest first)
    /// to the cache, at open: for each object, the records after its last
    /// `Stored` record. Reads every segment twice (positions, then
    /// records), so memory holds one segment at a time.
    pub(in crate::backend::s3) async fn replay(&self, segments: &[(u64, usize)]) -> io::Result<()> {
        self.replaying.store(true, Ordering::Release);
        let replayed = self.apply_segments(segments).await;
        self.replaying.store(false, Ordering::Release);
        if replayed.is_ok() && !segments.is_empty() {
            // Fold what was replayed soon, so the next open replays
            // little even if this server dies quickly too.
            self.room_wanted.notify_one();
        }
        replayed
    }

    async fn apply_segments(&self, segments: &[(u64, usize)]) -> io::Result<()> {
        let invalid = |sequence: u64, error: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("log segment {sequence:016x}: {error}"),
            )
        };
        let mut stored_since: HashMap<u64, Position> = HashMap::new();
        for &(sequence, _) in segments {
            let bytes = read_segment(&*self.store, &self.prefix, sequence).await?;
            let (_, records) = decode_segment(&bytes).map_err(|error| invalid(sequence, error))?;
            for (_, record) in records {
                if let Record::Stored { index, since } = record {
                    let latest = stored_since.entry(index).or_insert(since);
                    *latest = (*latest).max(since);
                }
            }
        }
        let end = self.size;
        for &(sequence, _) in segments {
            let bytes = read_segment(&*self.store, &self.prefix, sequence).await?;
            let (_, records) = decode_segment(&bytes).map_err(|error| invalid(sequence, error))?;
            for (position, record) in records {
                let (offset, length) = match record {
                    Record::Data { offset, data } => (offset, data.len() as u64),
                    Record::Zero { offset, length } => (offset, u64::from(length)),
                    Record::Stored { .. } => continue,
                };
                if offset
                    .checked_add(length)
                    .is_none_or(|record_end| record_end > end)
                {
                    return Err(invalid(
                        sequence,
                        format!("record at {offset} past the disk"),
                    ));
                }
                let index = offset / self.object_size;
                let start = (offset % self.object_size) as usize;
                if start as u64 + length > self.object_size {
                    return Err(invalid(
                        sequence,
                        format!("record at {offset} spans objects"),
                    ));
                }
                if stored_since
                    .get(&index)
                    .is_some_and(|&since| position < since)
                {
                    continue;
                }
                match record {
                    Record::Data { data, .. } => {
                        self.write_object(index, start, data, false).await?;
                    }
                    _ if length == self.object_size => self.zero_object(index, false).await?,
                    _ => {
                        let zeroes = vec![0; length as usize];
                        self.write_object(index, start, &zeroes, false).await?;
                    }
                }
            }
            self.evict();
        }
        Ok(())
    }
}
