//! A small write-ahead log with snapshots, for the ledger.
//!
//! Layout in the state directory:
//! - `ledger.wal`: one record a line, `<seq> <crc32-hex> <json>\n`. Appended and `fdatasync`ed
//!   before the caller acts on the record (the ledger's "persist before the action" rule).
//! - `ledger.snapshot.json`: `{"seq": N, "state": ...}`, written to a temporary file, synced and
//!   renamed over the old one, so a crash leaves either the old or the new snapshot.
//!
//! Replay loads the snapshot, then applies every WAL record with `seq > snapshot.seq` (a crash
//! between writing a snapshot and truncating the WAL therefore applies nothing twice). A torn last
//! line (a crash mid-append) is cut off with a warning: its action never started, because actions
//! wait for the append to return. A damaged line in the middle is an error that names the line —
//! vfplugd refuses to start rather than forget who owns a VF.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line in the middle of the log is damaged.
    #[error(
        "{path}:{line}: damaged ledger record ({reason}); refusing to guess VF ownership — inspect or restore the state directory"
    )]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A record or snapshot could not be encoded.
    #[error("encoding ledger data: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Snapshot<S> {
    seq: u64,
    state: S,
}

/// What [`Wal::open`] found on disk.
#[derive(Debug)]
pub struct Recovered<S, R> {
    /// The snapshot's state, if there was one.
    pub snapshot: Option<S>,
    /// Records after the snapshot, in order.
    pub records: Vec<R>,
    /// Whether a torn tail was cut off.
    pub truncated_tail: bool,
}

/// The log. `S` is the snapshot type, `R` the record type.
#[derive(Debug)]
pub struct Wal<S, R> {
    dir: PathBuf,
    wal_path: PathBuf,
    file: File,
    next_seq: u64,
    records_since_snapshot: usize,
    _types: PhantomData<fn(S, R)>,
}

impl<S: Serialize + DeserializeOwned, R: Serialize + DeserializeOwned> Wal<S, R> {
    /// Opens (creating if needed) the log in `dir` and reads back what it holds.
    pub fn open(dir: &Path) -> Result<(Self, Recovered<S, R>), WalError> {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let wal_path = dir.join("ledger.wal");
        let snap_path = dir.join("ledger.snapshot.json");

        let (snap_seq, snapshot) = match fs::read(&snap_path) {
            Ok(bytes) => {
                let snap: Snapshot<S> =
                    serde_json::from_slice(&bytes).map_err(|e| WalError::Corrupt {
                        path: snap_path.clone(),
                        line: 1,
                        reason: e.to_string(),
                    })?;
                (snap.seq, Some(snap.state))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, None),
            Err(e) => return Err(io("read", &snap_path)(e)),
        };

        let mut records = Vec::new();
        let mut last_seq = snap_seq;
        let mut good_len: u64 = 0;
        let mut truncated_tail = false;
        let mut records_since_snapshot = 0;
        match File::open(&wal_path) {
            Ok(f) => {
                let mut reader = BufReader::new(f);
                let mut line = Vec::new();
                let mut lineno = 0;
                loop {
                    line.clear();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(io("read", &wal_path))?;
                    if n == 0 {
                        break;
                    }
                    lineno += 1;
                    let complete = line.last() == Some(&b'\n');
                    match decode_line(&line) {
                        Ok((seq, json)) if complete => {
                            if seq <= last_seq && seq > snap_seq {
                                return Err(WalError::Corrupt {
                                    path: wal_path,
                                    line: lineno,
                                    reason: format!("sequence {seq} not above {last_seq}"),
                                });
                            }
                            if seq > snap_seq {
                                let rec = serde_json::from_slice(json).map_err(|e| {
                                    WalError::Corrupt {
                                        path: wal_path.clone(),
                                        line: lineno,
                                        reason: e.to_string(),
                                    }
                                })?;
                                records.push(rec);
                                records_since_snapshot += 1;
                                last_seq = seq;
                            }
                            good_len += n as u64;
                        }
                        result => {
                            // Only the very last line may be damaged: that is a torn append.
                            let at_end =
                                reader.fill_buf().map_err(io("read", &wal_path))?.is_empty();
                            if !at_end {
                                let reason = match result {
                                    Err(r) => r,
                                    Ok(_) => "unterminated line".into(),
                                };
                                return Err(WalError::Corrupt {
                                    path: wal_path,
                                    line: lineno,
                                    reason,
                                });
                            }
                            tracing::warn!(path = %wal_path.display(), line = lineno,
                                "cutting off a torn ledger record left by a crash mid-write");
                            truncated_tail = true;
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("open", &wal_path)(e)),
        }

        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&wal_path)
            .map_err(io("open", &wal_path))?;
        if truncated_tail {
            file.set_len(good_len).map_err(io("truncate", &wal_path))?;
            file.sync_all().map_err(io("sync", &wal_path))?;
        }
        let wal = Self {
            dir: dir.to_owned(),
            wal_path,
            file,
            next_seq: last_seq + 1,
            records_since_snapshot,
            _types: PhantomData,
        };
        Ok((
            wal,
            Recovered {
                snapshot,
                records,
                truncated_tail,
            },
        ))
    }

    /// Appends one record. With `sync`, returns only once it is on stable storage.
    pub fn append(&mut self, record: &R, sync: bool) -> Result<u64, WalError> {
        let seq = self.next_seq;
        let json = serde_json::to_vec(record)?;
        let crc = crc32fast::hash(&json);
        let mut line = Vec::with_capacity(json.len() + 32);
        write!(line, "{seq} {crc:08x} ").map_err(io("encode", &self.wal_path))?;
        line.extend_from_slice(&json);
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(io("append", &self.wal_path))?;
        if sync {
            self.file.sync_data().map_err(io("sync", &self.wal_path))?;
        }
        self.next_seq += 1;
        self.records_since_snapshot += 1;
        Ok(seq)
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.file.sync_data().map_err(io("sync", &self.wal_path))
    }

    /// Records appended since the last snapshot (the caller compacts when this grows).
    pub fn records_since_snapshot(&self) -> usize {
        self.records_since_snapshot
    }

    /// Writes `state` (which must include every record appended so far) as the new snapshot and
    /// empties the log.
    pub fn compact(&mut self, state: &S) -> Result<(), WalError> {
        let snap_path = self.dir.join("ledger.snapshot.json");
        let tmp_path = self.dir.join("ledger.snapshot.json.tmp");
        let bytes = serde_json::to_vec(&Snapshot {
            seq: self.next_seq - 1,
            state,
        })?;
        {
            let mut tmp = File::create(&tmp_path).map_err(io("create", &tmp_path))?;
            tmp.write_all(&bytes).map_err(io("write", &tmp_path))?;
            tmp.sync_all().map_err(io("sync", &tmp_path))?;
        }
        fs::rename(&tmp_path, &snap_path).map_err(io("rename", &snap_path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))?;
        // A crash here leaves old records in the log; their seq is not above the snapshot's, so
        // replay skips them.
        self.file
            .set_len(0)
            .map_err(io("truncate", &self.wal_path))?;
        self.file.sync_all().map_err(io("sync", &self.wal_path))?;
        self.records_since_snapshot = 0;
        Ok(())
    }
}

fn decode_line(line: &[u8]) -> Result<(u64, &[u8]), String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut parts = line.splitn(3, |b| *b == b' ');
    let seq = parts.next().ok_or("empty line")?;
    let crc = parts.next().ok_or("missing checksum")?;
    let json = parts.next().ok_or("missing record")?;
    let seq: u64 = std::str::from_utf8(seq)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad sequence number")?;
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or("bad checksum field")?;
    if crc32fast::hash(json) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((seq, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestWal = Wal<Vec<u32>, u32>;

    #[test]
    fn append_replay_and_compact() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, rec) = TestWal::open(dir.path()).unwrap();
            assert!(rec.snapshot.is_none() && rec.records.is_empty());
            for i in 0..5 {
                wal.append(&i, true).unwrap();
            }
        }
        let (mut wal, rec) = TestWal::open(dir.path()).unwrap();
        assert_eq!(rec.records, vec![0, 1, 2, 3, 4]);
        wal.compact(&vec![0, 1, 2, 3, 4]).unwrap();
        wal.append(&5, true).unwrap();
        drop(wal);
        let (_, rec) = TestWal::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot, Some(vec![0, 1, 2, 3, 4]));
        assert_eq!(rec.records, vec![5]);
    }

    #[test]
    fn torn_tail_is_cut_and_log_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = TestWal::open(dir.path()).unwrap();
            wal.append(&7, true).unwrap();
            wal.append(&8, true).unwrap();
        }
        let path = dir.path().join("ledger.wal");
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3); // crash in the middle of the second append
        fs::write(&path, &bytes).unwrap();
        let (mut wal, rec) = TestWal::open(dir.path()).unwrap();
        assert!(rec.truncated_tail);
        assert_eq!(rec.records, vec![7]);
        wal.append(&9, true).unwrap();
        drop(wal);
        let (_, rec) = TestWal::open(dir.path()).unwrap();
        assert_eq!(rec.records, vec![7, 9]);
        assert!(!rec.truncated_tail);
    }

    #[test]
    fn damage_in_the_middle_is_refused_with_line_number() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = TestWal::open(dir.path()).unwrap();
            for i in 0..3 {
                wal.append(&i, true).unwrap();
            }
        }
        let path = dir.path().join("ledger.wal");
        let text = fs::read_to_string(&path)
            .unwrap()
            .replacen(" 1\n", " 5\n", 1);
        fs::write(&path, text).unwrap();
        let err = TestWal::open(dir.path()).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { line: 2, .. }), "{err}");
    }

    #[test]
    fn crash_between_snapshot_and_truncate_applies_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = TestWal::open(dir.path()).unwrap();
        wal.append(&1, true).unwrap();
        wal.append(&2, true).unwrap();
        let wal_bytes = fs::read(dir.path().join("ledger.wal")).unwrap();
        wal.compact(&vec![1, 2]).unwrap();
        drop(wal);
        // Simulate the crash: the snapshot landed, the truncation did not.
        fs::write(dir.path().join("ledger.wal"), wal_bytes).unwrap();
        let (mut wal, rec) = TestWal::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot, Some(vec![1, 2]));
        assert!(rec.records.is_empty());
        assert_eq!(wal.append(&3, true).unwrap(), 3);
    }
}
