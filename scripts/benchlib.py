"""What the bench scripts share: the memory of host processes, their descendants, the open
file limit the rows run with, and runc's version. Imported by the scripts beside it."""

import os
import resource
import subprocess


def memory_of(pids):
    """(RSS, PSS) in KiB summed over pids."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def children(pid):
    """The direct children of pid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name in parentheses may hold blanks; the parent pid follows it.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def tree(pid):
    """pid and every process below it."""
    found, queue = [], [pid]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children(pid))
    return found


def raise_nofile():
    """Open files as containerd's and dockerd's services have them (LimitNOFILE=infinity, i.e.
    fs.nr_open): a file server (the runtime's share, virtiofsd, QEMU's 9p) keeps an open file
    per inode the guest remembers, and a walk of a large tree makes that many. Returns the
    limit the rows run with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            wanted = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        return wanted
    except (OSError, ValueError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (OSError, ValueError):
            return soft


def runc_version():
    out = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout
    return out.split()[2] if len(out.split()) > 2 else "?"
