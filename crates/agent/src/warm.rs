//! Reading what a container will need from its image into the guest's caches before a
//! snapshot is taken.
//!
//! A VM restored from a snapshot has the page cache, directory entries and inodes the baked
//! VM had. Where the guest kernel is slow (emulated, or translated by TCG) the disk reads of
//! a first `exec` and of setup's path lookups are a large part of a restored container's
//! start: each runs the block layer and virtio-blk, and under TCG all of that is new code to
//! translate in every restored VM. Reading the container's program, its mount destinations
//! and the password file while the root is prepared, before the snapshot, moves that cost to
//! the bake, paid once per image.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use agent_proto::RootfsSpec;

use crate::agent_debug;
use crate::paths::{DEFAULT_PATH, PASSWD};

/// Reads what the container will need from the prepared (not yet entered) `root`: its
/// programs, the paths its setup looks up, and the password file the first process reads
/// when its environment has no HOME (as runc's does).
pub fn warm_root(root: &Path, rootfs: &RootfsSpec) {
    read_programs(root, &rootfs.warm, rootfs.warm_path.as_deref());
    let mut lookups = rootfs.warm_lookups.clone();
    lookups.push(PASSWD.to_string());
    look_up(root, &lookups);
}

/// Reads each program (searched as `execvp` would, in `path`) and its ELF interpreter.
fn read_programs(root: &Path, programs: &[String], path: Option<&str>) {
    for program in programs {
        let Some(file) = find(root, program, path.unwrap_or(DEFAULT_PATH)) else {
            agent_debug!("warm: {program} not found in the image");
            continue;
        };
        match read_all(&file) {
            Ok((bytes, interpreter)) => {
                agent_debug!("warm: {} ({bytes} bytes)", file.display());
                if let Some(interpreter) = interpreter {
                    let interpreter = resolve_in_root(root, &interpreter);
                    if let Err(e) = read_all(&interpreter) {
                        agent_debug!("warm: {}: {e}", interpreter.display());
                    }
                }
            }
            Err(e) => agent_debug!("warm: {}: {e}", file.display()),
        }
    }
}

/// Small files are read whole: the container is likely to read those it does not cover.
const LOOKUP_READ_LIMIT: u64 = 64 << 10;

/// Looks up each path (setup's mount destinations) and reads the small files among them;
/// returns the files read.
fn look_up(root: &Path, paths: &[String]) -> Vec<PathBuf> {
    let mut read = Vec::new();
    for path in paths {
        let resolved = resolve_in_root(root, path);
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() && meta.len() <= LOOKUP_READ_LIMIT => {
                match read_all(&resolved) {
                    Ok(_) => read.push(resolved),
                    Err(e) => agent_debug!("warm: {}: {e}", resolved.display()),
                }
            }
            Ok(_) => {}
            Err(e) => agent_debug!("warm: {path}: {e}"),
        }
    }
    read
}

fn find(root: &Path, program: &str, path: &str) -> Option<PathBuf> {
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.to_string()]
    } else {
        path.split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| format!("{dir}/{program}"))
            .collect()
    };
    candidates
        .iter()
        .map(|c| resolve_in_root(root, c))
        .find(|p| p.is_file())
}

/// Reads the whole file; returns its size and, for an ELF program, its interpreter.
fn read_all(path: &Path) -> std::io::Result<(usize, Option<String>)> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut total = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.is_empty() {
            head = buf[..n].to_vec();
        }
        total += n;
    }
    Ok((total, elf_interpreter(&head)))
}

/// The `PT_INTERP` path of an ELF image whose program headers are within `head`.
fn elf_interpreter(head: &[u8]) -> Option<String> {
    if head.get(..4)? != b"\x7fELF" || *head.get(5)? != 1 {
        return None; // not ELF, or not little-endian
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(head.get(at..at + 8)?.try_into().ok()?));
    // (phoff, phentsize, phnum) and, within a header, (offset, filesz) of the segment.
    let (is64, phoff, phentsize, phnum) = match head.get(4)? {
        1 => (
            false,
            u64::from(u32_at(0x1c)?),
            u16_at(0x2a)?,
            u16_at(0x2c)?,
        ),
        2 => (true, u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?),
        _ => return None,
    };
    const PT_INTERP: u32 = 3;
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff).ok()? + i * usize::from(phentsize);
        if u32_at(at)? != PT_INTERP {
            continue;
        }
        let (offset, size) = if is64 {
            (u64_at(at + 8)?, u64_at(at + 32)?)
        } else {
            (u64::from(u32_at(at + 4)?), u64::from(u32_at(at + 16)?))
        };
        let start = usize::try_from(offset).ok()?;
        let bytes = head.get(start..start + usize::try_from(size).ok()?)?;
        let path = bytes.split(|&b| b == 0).next()?;
        return Some(String::from_utf8_lossy(path).into_owned());
    }
    None
}

/// Resolves `path` inside `root` as the container would see it: symlinks are followed with
/// `root` as `/`, and `..` never climbs above it. Missing components are kept as they are.
/// For the reads of the image before the agent enters the root; inside, the kernel does this.
fn resolve_in_root(root: &Path, path: &str) -> PathBuf {
    const MAX_LINKS: usize = 40;
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = components(Path::new(path));
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == OsStr::new("..") {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&name);
        let is_link = fs::symlink_metadata(&candidate)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if is_link && links < MAX_LINKS {
            links += 1;
            if let Ok(target) = fs::read_link(&candidate) {
                if target.is_absolute() {
                    resolved.clear();
                }
                for part in components(&target).into_iter().rev() {
                    pending.push_front(part);
                }
                continue;
            }
        }
        resolved.push(name);
    }
    root.join(resolved.iter().collect::<PathBuf>())
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF header with `phdrs` (type, offset, size) at 0x40.
    fn elf64(phdrs: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 0x40];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        out[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(kind, offset, size) in phdrs {
            let mut phdr = vec![0u8; 56];
            phdr[..4].copy_from_slice(&kind.to_le_bytes());
            phdr[8..16].copy_from_slice(&offset.to_le_bytes());
            phdr[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend(phdr);
        }
        out.extend_from_slice(tail);
        out
    }

    #[test]
    fn the_interpreter_comes_from_pt_interp() {
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let at = 0x40 + 2 * 56;
        let image = elf64(&[(1, 0, 0), (3, at as u64, interp.len() as u64)], interp);
        assert_eq!(
            elf_interpreter(&image).as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn static_programs_scripts_and_damaged_headers_have_none() {
        assert_eq!(elf_interpreter(&elf64(&[(1, 0, 0)], &[])), None);
        assert_eq!(elf_interpreter(b"#!/bin/sh\necho hi\n"), None);
        // PT_INTERP pointing past the bytes read.
        assert_eq!(elf_interpreter(&elf64(&[(3, 4096, 20)], &[])), None);
        let mut truncated = elf64(&[(3, 0x78, 4)], b"/x\0\0");
        truncated.truncate(0x50);
        assert_eq!(elf_interpreter(&truncated), None);
    }

    #[test]
    fn programs_are_searched_in_the_path_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        std::fs::write(root.path().join("bin/busybox"), b"x").unwrap();
        std::os::unix::fs::symlink("busybox", root.path().join("bin/true")).unwrap();
        assert_eq!(
            find(root.path(), "true", "/usr/bin:/bin"),
            Some(root.path().join("bin/busybox"))
        );
        assert_eq!(
            find(root.path(), "/bin/true", ""),
            Some(root.path().join("bin/busybox"))
        );
        assert_eq!(find(root.path(), "missing", "/usr/bin:/bin"), None);
    }

    #[test]
    fn lookups_read_small_files_only_and_resolve_links_in_the_root() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("hosts"), b"127.0.0.1 localhost\n").unwrap();
        std::fs::write(etc.join("big"), vec![0u8; LOOKUP_READ_LIMIT as usize + 1]).unwrap();
        // Absolute, as the image sees it: not the host's /etc/hostname.
        std::os::unix::fs::symlink("/etc/hosts", etc.join("hostname")).unwrap();
        let paths = ["/etc/hosts", "/etc/big", "/etc", "/proc", "/etc/hostname"];
        let read = look_up(root.path(), &paths.map(String::from));
        assert_eq!(read, vec![etc.join("hosts"), etc.join("hosts")]);
    }

    #[test]
    fn resolution_follows_symlinks_without_leaving_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let symlink = std::os::unix::fs::symlink::<&str, PathBuf>;
        fs::create_dir_all(root.join("run/systemd")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("../run/systemd/resolv.conf", root.join("etc/resolv.conf")).unwrap();
        symlink("/../../../etc", root.join("escape")).unwrap();

        assert_eq!(
            resolve_in_root(&root, "/etc/resolv.conf"),
            root.join("run/systemd/resolv.conf")
        );
        assert_eq!(
            resolve_in_root(&root, "/escape/hosts"),
            root.join("etc/hosts")
        );
        assert_eq!(resolve_in_root(&root, "/../../x/./y"), root.join("x/y"));
    }
}
