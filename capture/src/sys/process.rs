//! Child processes: how the filter compiler's child is confined.

use std::{io, os::unix::process::CommandExt as _, process::Command};

/// Sets `command` up for a child that works on what clients sent (libpcap's parser for the
/// filter compiler), before it runs:
///
/// - killed (SIGKILL) when the thread that spawns it ends, so with the process: it never
///   outlives the process that asked for its work (the spawn fails if that process is already
///   gone);
/// - without this process's ambient capabilities (best effort: a kernel without ambient
///   capabilities has none to drop);
/// - at niceness `nice`, behind the capture's writers for the CPU.
pub fn confine_child(command: &mut Command, nice: libc::c_int) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, setpriority) on plain integers; it
    // allocates nothing (its errors are raw OS errors) and touches no lock.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the line above.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            Ok(())
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_child_runs_niced_without_ambient_capabilities() {
        let mut command = Command::new("sh");
        command.args(["-c", "cat /proc/self/stat /proc/self/status"]);
        confine_child(&mut command, 7);
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let stat = text.lines().next().unwrap();
        // Fields after the command name: state is the 3rd field, nice the 19th.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        assert_eq!(fields[16], "7", "nice in {stat}");
        let ambient = text.lines().find_map(|l| l.strip_prefix("CapAmb:")).map(str::trim);
        assert!(ambient.is_none_or(|a| a.trim_start_matches('0').is_empty()), "{ambient:?}");
    }
}
