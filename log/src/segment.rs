//! One segment: a file of consecutive record batches starting at `base_offset`, plus its
//! sparse offset and time indexes.
//!
//! A segment is only ever appended to, truncated at a batch boundary, or deleted. Opening one
//! either trusts its indexes (segments below the recovery point, written and fsync'd when they
//! closed) or recovers it: a scan that checks every batch's CRC, stops at the first bad one,
//! truncates the file there, and rebuilds the indexes.
//!
//! # Zero tail
//! With preallocation on, the active segment's file runs past its logical end (`size`) with
//! zeros that were written and fdatasync'd ahead of time (`allocated` is the file's length),
//! so an append overwrites allocated, written blocks and its fdatasync changes no metadata.
//! Everything that reads the segment stops at `size`. Closing a segment (roll, clean close)
//! cuts the file back to `size` first, so a closed segment never has a tail; recovery treats
//! an all-zero remainder of the active segment as its end, not as damage.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::{BATCH_HEADER_LEN, BatchHeader};
use crate::error::{LogError, Result};
use crate::fsutil;
use crate::index::{OffsetEntry, OffsetIndex, TimeEntry, TimeIndex};

pub(crate) const LOG_SUFFIX: &str = ".log";
pub(crate) const OFFSET_INDEX_SUFFIX: &str = ".index";
pub(crate) const TIME_INDEX_SUFFIX: &str = ".timeindex";

/// Buffer used when scanning a segment; batches larger than this are streamed through it.
const SCAN_BUFFER_BYTES: usize = 256 * 1024;

/// Zeros written at a time when extending a zero tail.
const ZERO_WRITE_BYTES: usize = 256 * 1024;
static ZEROS: [u8; ZERO_WRITE_BYTES] = [0; ZERO_WRITE_BYTES];

/// `<base_offset:020><suffix>`, the fixed file naming of segments.
pub(crate) fn file_name(base_offset: u64, suffix: &str) -> String {
    format!("{base_offset:020}{suffix}")
}

/// The base offset and suffix of a segment file name, or `None` for any other name.
pub(crate) fn parse_file_name(name: &str) -> Option<(u64, &'static str)> {
    for suffix in [LOG_SUFFIX, OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX] {
        if let Some(stem) = name
            .strip_suffix(suffix)
            .filter(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        {
            return stem.parse().ok().map(|base| (base, suffix));
        }
    }
    None
}

/// What a recovery scan found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanOutcome {
    /// Bytes cut off the end of the segment because they were not a valid batch.
    pub(crate) truncated_bytes: u64,
    /// Bytes cut off the end because they were all zeros: a preallocated tail, which is the
    /// end of the active segment and not damage.
    pub(crate) zero_tail_bytes: u64,
}

/// Why a scan stopped before the end of the file.
#[derive(Debug)]
enum Stop {
    /// A partial or invalid batch starts at this position.
    Invalid { position: u64, reason: String },
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    dir: PathBuf,
    file: Arc<File>,
    /// Bytes of whole batches in the file.
    size: u64,
    /// Length of the file: `size` plus the zero tail, if any.
    allocated: u64,
    /// One past the last offset in the segment; `base_offset` when empty.
    next_offset: u64,
    /// Largest batch max timestamp; `i64::MIN` when empty.
    max_timestamp: i64,
    /// Wall-clock time the first batch was appended, for `segment.ms`.
    first_append_ms: Option<i64>,
    offset_index: OffsetIndex,
    time_index: TimeIndex,
    bytes_since_offset_entry: u64,
    bytes_since_time_entry: u64,
    index_interval_bytes: u64,
}

impl Segment {
    /// Creates an empty segment file and fsyncs the directory.
    pub(crate) fn create(dir: &Path, base_offset: u64, index_interval_bytes: u32) -> Result<Self> {
        let path = dir.join(file_name(base_offset, LOG_SUFFIX));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(LogError::io(&path))?;
        fsutil::fsync_dir(dir)?;
        Ok(Segment::empty(dir, base_offset, file, index_interval_bytes))
    }

    fn empty(dir: &Path, base_offset: u64, file: File, index_interval_bytes: u32) -> Self {
        Segment {
            base_offset,
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            size: 0,
            allocated: 0,
            next_offset: base_offset,
            max_timestamp: i64::MIN,
            first_append_ms: None,
            offset_index: OffsetIndex::default(),
            time_index: TimeIndex::default(),
            bytes_since_offset_entry: 0,
            bytes_since_time_entry: 0,
            index_interval_bytes: u64::from(index_interval_bytes.max(1)),
        }
    }

    fn open_file(dir: &Path, base_offset: u64) -> Result<(File, u64)> {
        let path = dir.join(file_name(base_offset, LOG_SUFFIX));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(LogError::io(&path))?;
        let len = file.metadata().map_err(LogError::io(&path))?.len();
        Ok((file, len))
    }

    /// Opens a segment that was closed cleanly: its indexes are trusted when they are valid and
    /// rebuilt otherwise. Any invalid batch is corruption and an error, because the segment
    /// was fsync'd whole before anything was built on it.
    pub(crate) fn open_trusted(
        dir: &Path,
        base_offset: u64,
        index_interval_bytes: u32,
    ) -> Result<Self> {
        let (file, len) = Self::open_file(dir, base_offset)?;
        let mut segment = Segment::empty(dir, base_offset, file, index_interval_bytes);
        segment.size = len;
        segment.allocated = len;
        let loaded = segment.load_indexes(len);
        // Rescan from the earlier of the last entries of the two indexes: every batch before
        // it is covered by them, and both entries name the offset of the batch they point at.
        let scan_from = match loaded {
            Some((offsets, times)) => {
                let from_offsets = offsets
                    .last()
                    .map_or((0, 0), |e| (e.position, e.relative_offset));
                let from_times = times
                    .last()
                    .map_or((0, 0), |e| (e.position, e.relative_offset));
                let (position, relative_offset) = from_offsets.min(from_times);
                segment.max_timestamp = times.last().map_or(i64::MIN, |e| e.max_timestamp);
                segment.next_offset = base_offset + u64::from(relative_offset);
                segment.offset_index = offsets;
                segment.time_index = times;
                u64::from(position)
            }
            None => 0,
        };
        let rebuild = scan_from == 0;
        if rebuild {
            segment.offset_index = OffsetIndex::default();
            segment.time_index = TimeIndex::default();
            segment.max_timestamp = i64::MIN;
            segment.next_offset = base_offset;
        }
        match segment.scan(scan_from, false, rebuild)? {
            None => Ok(segment.aged_from_load()),
            Some(Stop::Invalid { position, reason }) => Err(LogError::corrupt(
                segment.log_path(),
                format!("invalid batch at byte {position} of a closed segment: {reason}"),
            )),
        }
    }

    /// Opens a segment after an unclean stop: checks every batch's CRC, truncates the file at
    /// the first invalid batch, and rebuilds the indexes. `expected_base` is the lowest base
    /// offset the first batch may have. With `zeros_end_it` (preallocation on), an invalid
    /// batch followed by nothing but zeros to the end of the file is a zero tail: cut off
    /// like damage, but counted apart in [`ScanOutcome::zero_tail_bytes`].
    pub(crate) fn recover(
        dir: &Path,
        base_offset: u64,
        index_interval_bytes: u32,
        zeros_end_it: bool,
    ) -> Result<(Self, ScanOutcome)> {
        let (file, len) = Self::open_file(dir, base_offset)?;
        let mut segment = Segment::empty(dir, base_offset, file, index_interval_bytes);
        segment.size = len;
        segment.allocated = len;
        let stop = segment.scan(0, true, true)?;
        let mut outcome = ScanOutcome {
            truncated_bytes: 0,
            zero_tail_bytes: 0,
        };
        if let Some(Stop::Invalid { position, reason }) = stop {
            if zeros_end_it && segment.zeros_from(position, len)? {
                tracing::debug!(
                    segment = %segment.log_path().display(),
                    position,
                    zero_bytes = len - position,
                    "cutting the zero tail off a recovered segment"
                );
                outcome.zero_tail_bytes = len - position;
                segment.truncate_file(position)?;
                return Ok((segment.aged_from_load(), outcome));
            }
            tracing::warn!(
                segment = %segment.log_path().display(),
                position,
                reason = %reason,
                "truncating segment at first invalid batch"
            );
            outcome.truncated_bytes = len - position;
            segment.truncate_file(position)?;
        }
        Ok((segment.aged_from_load(), outcome))
    }

    /// Whether every byte of the file from `position` to `end` is zero.
    fn zeros_from(&self, mut position: u64, end: u64) -> Result<bool> {
        let mut chunk = vec![0u8; ZERO_WRITE_BYTES];
        while position < end {
            let take = (end - position).min(chunk.len() as u64) as usize;
            self.file
                .read_exact_at(&mut chunk[..take], position)
                .map_err(LogError::io(self.log_path()))?;
            if chunk[..take].iter().any(|byte| *byte != 0) {
                return Ok(false);
            }
            position += take as u64;
        }
        Ok(true)
    }

    /// Reads the index files, returning them only if both are present and valid.
    fn load_indexes(&self, segment_bytes: u64) -> Option<(OffsetIndex, TimeIndex)> {
        let offsets = fs::read(
            self.dir
                .join(file_name(self.base_offset, OFFSET_INDEX_SUFFIX)),
        );
        let times = fs::read(
            self.dir
                .join(file_name(self.base_offset, TIME_INDEX_SUFFIX)),
        );
        let (Ok(offsets), Ok(times)) = (offsets, times) else {
            return None;
        };
        match (
            OffsetIndex::decode(&offsets, segment_bytes),
            TimeIndex::decode(&times, segment_bytes),
        ) {
            (Ok(offsets), Ok(times)) => Some((offsets, times)),
            (Err(reason), _) | (_, Err(reason)) => {
                tracing::warn!(
                    segment = %self.log_path().display(),
                    reason,
                    "rebuilding invalid segment index"
                );
                None
            }
        }
    }

    /// Walks the batches from `position` to the end of the file, updating the segment's end,
    /// timestamps and (when `index` is set) its indexes. With `verify`, every CRC is checked.
    /// Returns where and why it stopped early, leaving `size` at the last good batch's end.
    fn scan(&mut self, position: u64, verify: bool, index: bool) -> Result<Option<Stop>> {
        let file_len = self.size;
        let path = self.log_path();
        let file = self.file.clone();
        let mut reader = BufReader::with_capacity(SCAN_BUFFER_BYTES, &*file);
        reader
            .seek(SeekFrom::Start(position))
            .map_err(LogError::io(&path))?;
        let mut position = position;
        let mut header_bytes = [0u8; BATCH_HEADER_LEN];
        let mut chunk = vec![0u8; 64 * 1024];
        self.size = position;
        while position < file_len {
            let invalid = |reason: String| Ok(Some(Stop::Invalid { position, reason }));
            if file_len - position < BATCH_HEADER_LEN as u64 {
                return invalid("partial batch header".into());
            }
            reader
                .read_exact(&mut header_bytes)
                .map_err(LogError::io(&path))?;
            let header = match BatchHeader::parse(&header_bytes) {
                Ok(Some(header)) => header,
                Ok(None) => return invalid("partial batch header".into()),
                Err(error) => return invalid(error.to_string()),
            };
            let total = header.total_len() as u64;
            if total > file_len - position {
                return invalid(format!("batch of {total} bytes is cut off"));
            }
            // Offsets are contiguous in a Silt log; the base offset sits outside the CRC, so
            // this is the check that catches its damage.
            if header.base_offset < 0 || header.base_offset as u64 != self.next_offset {
                return invalid(format!(
                    "batch base offset {} does not continue at {}",
                    header.base_offset, self.next_offset
                ));
            }
            if header.last_offset() as u64 - self.base_offset > u64::from(u32::MAX) {
                return invalid("batch offsets overflow the segment".into());
            }
            let body = total - BATCH_HEADER_LEN as u64;
            if verify {
                let mut crc = crc32c::crc32c(&header_bytes[21..]);
                let mut left = body;
                while left > 0 {
                    let take = left.min(chunk.len() as u64) as usize;
                    reader
                        .read_exact(&mut chunk[..take])
                        .map_err(LogError::io(&path))?;
                    crc = crc32c::crc32c_append(crc, &chunk[..take]);
                    left -= take as u64;
                }
                if crc != header.crc {
                    return invalid(format!(
                        "crc mismatch: stored {:#010x}, computed {crc:#010x}",
                        header.crc
                    ));
                }
            } else {
                reader
                    .seek_relative(body as i64)
                    .map_err(LogError::io(&path))?;
            }
            self.note_batch(&header, position, index);
            position += total;
            self.size = position;
        }
        Ok(None)
    }

    /// Records a batch that now occupies `position..` in the segment.
    fn note_batch(&mut self, header: &BatchHeader, position: u64, index: bool) {
        let total = header.total_len() as u64;
        let relative = (header.base_offset as u64 - self.base_offset) as u32;
        let position32 = position as u32;
        self.next_offset = header.last_offset() as u64 + 1;
        let new_max = header.max_timestamp > self.max_timestamp;
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        if !index {
            return;
        }
        if self.offset_index.len() == 0
            || self.bytes_since_offset_entry >= self.index_interval_bytes
        {
            self.push_offset_entry(relative, position32);
            self.bytes_since_offset_entry = 0;
        }
        if new_max
            && (self.time_index.len() == 0
                || self.bytes_since_time_entry >= self.index_interval_bytes)
        {
            self.push_time_entry(self.max_timestamp, relative, position32);
            self.bytes_since_time_entry = 0;
        }
        self.bytes_since_offset_entry += total;
        self.bytes_since_time_entry += total;
    }

    fn push_offset_entry(&mut self, relative_offset: u32, position: u32) {
        self.offset_index.push_if_new(OffsetEntry {
            relative_offset,
            position,
        });
    }

    fn push_time_entry(&mut self, max_timestamp: i64, relative_offset: u32, position: u32) {
        self.time_index.push_if_new(TimeEntry {
            max_timestamp,
            relative_offset,
            position,
        });
    }

    /// Appends the bytes of whole, validated batches whose offsets are already assigned.
    /// `headers` describe `bytes` in order.
    pub(crate) fn append(
        &mut self,
        bytes: &[u8],
        headers: &[(BatchHeader, usize)],
        now_ms: i64,
    ) -> Result<()> {
        let position = self.size;
        if let Err(error) = self.file.write_all_at(bytes, position) {
            // Cut off whatever part was written, so the file ends at a batch boundary (the
            // zero tail goes too; the next extension puts it back).
            let _ = self.file.set_len(position);
            self.allocated = position;
            return Err(LogError::io(self.log_path())(error));
        }
        let mut at = position;
        for (header, len) in headers {
            self.note_batch(header, at, true);
            at += *len as u64;
        }
        self.size = at;
        self.allocated = self.allocated.max(at);
        self.first_append_ms.get_or_insert(now_ms);
        Ok(())
    }

    /// Bytes of zeros past the logical end.
    pub(crate) fn zero_tail_bytes(&self) -> u64 {
        self.allocated - self.size
    }

    /// Writes zeros past the end of the file until it is `allocated_end` long (page cache
    /// only: the caller fdatasyncs them, outside its locks). On an error the file is cut back
    /// to where the zeros started.
    pub(crate) fn extend_zero_tail(&mut self, allocated_end: u64) -> Result<()> {
        let start = self.allocated.max(self.size);
        let mut position = start;
        while position < allocated_end {
            let take = (allocated_end - position).min(ZERO_WRITE_BYTES as u64) as usize;
            if let Err(error) = self.file.write_all_at(&ZEROS[..take], position) {
                let _ = self.file.set_len(start);
                self.allocated = start;
                return Err(LogError::io(self.log_path())(error));
            }
            position += take as u64;
        }
        self.allocated = self.allocated.max(position);
        Ok(())
    }

    /// Cuts the zero tail off (ftruncate, then fsync), so the file ends at its last batch: a
    /// segment must have no tail once it is closed.
    pub(crate) fn trim_zero_tail(&mut self) -> Result<()> {
        if self.allocated <= self.size {
            return Ok(());
        }
        let path = self.log_path();
        self.file.set_len(self.size).map_err(LogError::io(&path))?;
        self.file.sync_all().map_err(LogError::io(&path))?;
        self.allocated = self.size;
        Ok(())
    }

    /// Cuts the file at `position` (a batch boundary), drops index entries beyond it, and
    /// fsyncs the file.
    fn truncate_file(&mut self, position: u64) -> Result<()> {
        let path = self.log_path();
        self.file.set_len(position).map_err(LogError::io(&path))?;
        self.file.sync_all().map_err(LogError::io(&path))?;
        self.size = position;
        self.allocated = position;
        self.offset_index.truncate_to_position(position as u32);
        self.time_index.truncate_to_position(position as u32);
        Ok(())
    }

    /// Removes every batch whose last offset is at or beyond `offset`; a batch that straddles
    /// `offset` goes whole. Returns the new end offset of the segment.
    pub(crate) fn truncate_to(&mut self, offset: u64) -> Result<u64> {
        if offset >= self.next_offset {
            return Ok(self.next_offset);
        }
        let mut position = 0;
        let mut kept_next = self.base_offset;
        let mut kept_max = i64::MIN;
        let mut header_bytes = [0u8; BATCH_HEADER_LEN];
        while position < self.size {
            self.file
                .read_exact_at(&mut header_bytes, position)
                .map_err(LogError::io(self.log_path()))?;
            let header = BatchHeader::parse(&header_bytes)?
                .ok_or_else(|| LogError::corrupt(self.log_path(), "partial batch header"))?;
            if header.last_offset() as u64 >= offset {
                break;
            }
            kept_next = header.last_offset() as u64 + 1;
            kept_max = kept_max.max(header.max_timestamp);
            position += header.total_len() as u64;
        }
        self.truncate_file(position)?;
        self.next_offset = kept_next;
        self.max_timestamp = kept_max;
        self.bytes_since_offset_entry = self.index_interval_bytes;
        self.bytes_since_time_entry = self.index_interval_bytes;
        if self.size == 0 {
            self.first_append_ms = None;
        }
        self.persist_indexes()?;
        Ok(self.next_offset)
    }

    /// Writes both index files atomically and durably.
    pub(crate) fn persist_indexes(&self) -> Result<()> {
        fsutil::write_atomic(
            &self
                .dir
                .join(file_name(self.base_offset, OFFSET_INDEX_SUFFIX)),
            &self.offset_index.encode(),
        )?;
        fsutil::write_atomic(
            &self
                .dir
                .join(file_name(self.base_offset, TIME_INDEX_SUFFIX)),
            &self.time_index.encode(),
        )
    }

    /// fsyncs the segment's data.
    pub(crate) fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(LogError::io(self.log_path()))
    }

    /// Deletes the segment's files and fsyncs the directory.
    pub(crate) fn delete(self) -> Result<()> {
        delete_files(&self.dir, self.base_offset)
    }

    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.join(file_name(self.base_offset, LOG_SUFFIX))
    }

    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub(crate) fn max_timestamp(&self) -> i64 {
        self.max_timestamp
    }

    pub(crate) fn first_append_ms(&self) -> Option<i64> {
        self.first_append_ms
    }

    /// A segment's age for `segment.ms` is not stored on disk: a loaded segment that holds data
    /// counts its age from the load, whether it is active now or becomes active later (after a
    /// truncation).
    fn aged_from_load(mut self) -> Self {
        if self.size > 0 {
            self.first_append_ms = Some(crate::time::now_ms());
        }
        self
    }

    /// Where to start scanning for `offset`: the position of the last indexed batch at or
    /// before it.
    pub(crate) fn scan_start_for_offset(&self, offset: u64) -> u64 {
        let relative = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        u64::from(self.offset_index.lookup(relative).position)
    }

    /// Where to start scanning for the first record at or after `timestamp`.
    pub(crate) fn scan_start_for_timestamp(&self, timestamp: i64) -> u64 {
        u64::from(self.time_index.scan_start(timestamp))
    }
}

/// Deletes the files of the segment at `base_offset` without opening it, then fsyncs `dir`.
pub(crate) fn delete_files(dir: &Path, base_offset: u64) -> Result<()> {
    for suffix in [OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX, LOG_SUFFIX] {
        let path = dir.join(file_name(base_offset, suffix));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(LogError::io(path)(error)),
        }
    }
    fsutil::fsync_dir(dir)
}

/// Walks batch headers from `position` up to `end` in `file` and returns the position and
/// header of the first batch whose last offset is at or beyond `offset`, if any.
pub(crate) fn find_batch(
    file: &File,
    path: &Path,
    mut position: u64,
    end: u64,
    offset: u64,
) -> Result<Option<(u64, BatchHeader)>> {
    let mut header_bytes = [0u8; BATCH_HEADER_LEN];
    while position + BATCH_HEADER_LEN as u64 <= end {
        file.read_exact_at(&mut header_bytes, position)
            .map_err(LogError::io(path))?;
        let header = BatchHeader::parse(&header_bytes)?
            .ok_or_else(|| LogError::corrupt(path, "partial batch header"))?;
        if header.last_offset() >= 0 && header.last_offset() as u64 >= offset {
            return Ok(Some((position, header)));
        }
        position += header.total_len() as u64;
    }
    Ok(None)
}
