//! A minimal writer for the `newc` cpio format, the only format the Linux kernel unpacks as an
//! initramfs. We write the archive ourselves (uncompressed: the kernel accepts that) so the lab needs
//! neither `cpio` nor `gzip` on the machine, and so image building is a plain, testable function.
//!
//! Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst): each entry
//! is a 110-byte ASCII header (`070701` + 13 eight-digit hex fields), the NUL-terminated name, padding
//! to 4 bytes, the data, padding to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

/// File type bits of `st_mode` as cpio stores them.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An in-memory newc archive being built. Entries are written in the order they are added, so add
/// directories before the files inside them (the kernel does not create missing parents).
#[derive(Debug, Default)]
pub struct NewcArchive {
    buf: Vec<u8>,
    next_ino: u32,
}

impl NewcArchive {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory (`path` without a leading `/`, e.g. `"bin"`).
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, &[], (0, 0));
        self
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, data, (0, 0));
        self
    }

    /// Adds a symbolic link `path -> target` (the target is stored as the entry's data).
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0));
        self
    }

    /// Adds a character device node. The kernel needs `dev/console` (5, 1) in the image to give
    /// `/init` a stdout before devtmpfs is mounted.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, &[], (major, minor));
        self
    }

    /// Appends the trailer and returns the archive bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, &[], (0, 0));
        self.buf
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let fields: [u32; 13] = [
            ino,
            mode,
            0, // uid: root
            0, // gid: root
            nlink,
            0, // mtime: fixed, so images are reproducible
            // Lengths above 4 GiB cannot occur here (images are a few MiB); saturate defensively.
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check (only used by the crc format)
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent reader of the format, used to check what the writer produced.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            let start = total - b.len();
            assert_eq!(start % 4, 0, "entry not 4-aligned");
            assert_eq!(&b[..6], b"070701", "bad magic at {start}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let mode = field(1) as u32;
            let rdev = (field(9), field(10));
            let size = field(6);
            let namesize = field(11);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_off = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_off..data_off + size].to_vec();
            let next = (data_off + size).div_ceil(4) * 4;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty(), "bytes after trailer");
                return out;
            }
            if mode & 0o170_000 == S_IFCHR {
                assert_eq!(rdev, (5, 1), "only /dev/console is used in these tests");
            } else {
                assert_eq!(rdev, (0, 0));
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn round_trips_dirs_files_and_symlinks() {
        let mut a = NewcArchive::new();
        a.dir("bin", 0o755)
            .file("bin/busybox", 0o755, b"\x7fELF...")
            .symlink("bin/sh", "busybox")
            .file("/init", 0o755, b"#!/bin/sh\n")
            .dir("dev", 0o755)
            .char_dev("dev/console", 0o600, 5, 1);
        let entries = parse(&a.finish());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "init", "dev", "dev/console"]
        );
        assert_eq!(entries[5].1, S_IFCHR | 0o600);
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[1].2, b"\x7fELF...");
        assert_eq!(entries[2].1, S_IFLNK | 0o777);
        assert_eq!(entries[2].2, b"busybox");
        assert_eq!(entries[3].2, b"#!/bin/sh\n");
    }

    #[test]
    fn every_name_length_keeps_alignment() {
        // Name and data lengths 1..=9 cover every padding remainder for both paddings.
        let mut a = NewcArchive::new();
        for n in 1..=9usize {
            a.file(&"x".repeat(n), 0o644, &vec![b'd'; n]);
        }
        let entries = parse(&a.finish());
        assert_eq!(entries.len(), 9);
        for (i, (name, _, data)) in entries.iter().enumerate() {
            assert_eq!(name.len(), i + 1);
            assert_eq!(data.len(), i + 1);
        }
    }

    #[test]
    fn empty_archive_is_just_a_trailer() {
        let bytes = NewcArchive::new().finish();
        assert!(parse(&bytes).is_empty());
        assert_eq!(bytes.len() % 4, 0);
    }
}
