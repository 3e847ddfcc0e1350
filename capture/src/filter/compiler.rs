//! libpcap's compiler, bounded, for expressions that come from clients.
//!
//! libpcap's optimizer takes time that grows steeply with the expression (measured: 0.2, 0.9,
//! 7.9 and 55 s for lists of 100, 200, 400 and 800 hosts; over 10 minutes for 2,000), cannot
//! be interrupted, and keeps global state ([`super::pcap`] serializes every call into it). So
//! expressions are first held to a length cap ([`check_length`], and the daemon's
//! `limits.max_filter_bytes`), and the daemon compiles each one in a child process of its own
//! ([`BoundedCompiler`]): the `tapstream` binary itself, run as `tapstream filter
//! compile-child`, killed at a deadline. A runaway compile then holds no lock and no thread of
//! the daemon beyond that deadline; other requests compile beside it, and a stopping daemon
//! kills it at once. At most one compile a core runs at once ([`Slots`]): a burst of requests
//! waits its turn instead of starting a process each, and a compile's deadline counts its own
//! run, not its wait.
//!
//! The child reads the expression on stdin and writes to stdout either `ok` and one
//! instruction per line (`code jt jf k`, in decimal), or `error` and libpcap's message,
//! verbatim (or `fail` and the reason libpcap could not be asked at all).

use std::{
    ffi::OsString,
    io::{Read, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{CbpfProgram, FilterError, pcap::BpfInsn};
use crate::sys::{self, Shutdown};

/// Longest expression the command line compiles (`tapstream capture ... EXPR`, `tapstream
/// filter check`): far above any filter written by hand, and a guard against a file pasted by
/// mistake; libpcap would take hours on it. Whoever runs the command can interrupt it, so the
/// bound is generous; the daemon's own cap is `limits.max_filter_bytes`.
pub const CLI_MAX_FILTER_BYTES: usize = 64 * 1024;

/// The arguments of `tapstream` that make it the compiler child.
pub const CHILD_ARGS: [&str; 2] = ["filter", "compile-child"];

/// Longest input the child reads: above any cap (the control API takes 64 KiB bodies).
const CHILD_MAX_INPUT: u64 = 1 << 20;

/// How often a waiting compile looks at its cancel signal.
const POLL: Duration = Duration::from_millis(50);

/// Niceness of the compiler child: the capture's writers come first for the CPU.
const CHILD_NICE: libc::c_int = 10;

/// Refuses an expression longer than `limit` bytes (`setting` names the bound in the message).
pub fn check_length(expression: &str, limit: usize, setting: &'static str) -> Result<(), FilterError> {
    if expression.len() > limit {
        return Err(FilterError::TooLong { bytes: expression.len(), setting, limit });
    }
    Ok(())
}

/// Compiles expressions in a child process, abandoned (killed) past a time limit.
#[derive(Clone, Debug)]
pub struct BoundedCompiler {
    program: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
    /// Names the time limit in messages (e.g. `limits.filter_compile_timeout_secs`).
    setting: &'static str,
    /// Compiles that may run at once, shared by the clones.
    slots: std::sync::Arc<Slots>,
}

/// A count of free places, taken while a compile runs.
#[derive(Debug)]
pub struct Slots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Slots {
    fn new(places: usize) -> Self {
        Self { free: std::sync::Mutex::new(places.max(1)), freed: std::sync::Condvar::new() }
    }

    /// Waits for a free place; `None` if `cancel` is triggered first.
    fn take(&self, cancel: &Shutdown) -> Option<SlotGuard<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            if cancel.is_set() {
                return None;
            }
            free = self.freed.wait_timeout(free, POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
        *free -= 1;
        Some(SlotGuard(self))
    }
}

/// A place taken; given back when dropped.
struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

impl BoundedCompiler {
    /// The running `tapstream` binary as the compiler. It is run as `/proc/self/exe`, which
    /// in the child is the parent's own binary: the same build (so the same protocol) even
    /// after an upgrade replaced the file on disk.
    pub fn this_binary(timeout: Duration, setting: &'static str) -> Self {
        Self::with_program("/proc/self/exe", CHILD_ARGS, timeout, setting)
    }

    /// Any program that speaks the child's protocol (for tests).
    pub fn with_program(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        timeout: Duration,
        setting: &'static str,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            timeout,
            setting,
            slots: std::sync::Arc::new(Slots::new(sys::online_cores())),
        }
    }

    /// The time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Compiles `expression` in a child process. Past the time limit, or as soon as `cancel`
    /// is triggered (looked at every 50 ms), the child is killed and the compile refused.
    pub fn compile(&self, expression: &str, cancel: &Shutdown) -> Result<CbpfProgram, FilterError> {
        if expression.contains('\0') {
            return Err(FilterError::Nul);
        }
        let Some(_slot) = self.slots.take(cancel) else { return Err(FilterError::Cancelled) };
        let failed = |reason: String| FilterError::CompilerFailed { reason };
        let mut command = Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        // Killed with the thread that waits for it, so with the daemon: a compile never
        // outlives the process that asked for it. libpcap's parser sees client input: it runs
        // without the daemon's ambient capabilities, and behind the writers for the CPU.
        sys::confine_child(&mut command, CHILD_NICE);
        let mut child = command
            .spawn()
            .map_err(|source| FilterError::CompilerSpawn { program: self.program.clone(), source })?;
        let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed("the child's pipes are missing".into()));
        };
        let deadline = Instant::now() + self.timeout;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let outcome = std::thread::scope(|s| {
            // Both helpers end when the child does: its end of each pipe closes.
            let writer =
                std::thread::Builder::new().name("tapstream-compile-in".into()).spawn_scoped(s, || {
                    let _ = stdin.write_all(expression.as_bytes());
                    drop(stdin);
                });
            let reader =
                std::thread::Builder::new().name("tapstream-compile-out".into()).spawn_scoped(s, || {
                    let mut out = Vec::new();
                    let _ = tx.send(stdout.read_to_end(&mut out).map(|_| out));
                });
            let outcome = match (writer, reader) {
                (Ok(_), Ok(_)) => loop {
                    let now = Instant::now();
                    match rx.recv_timeout(POLL.min(deadline.saturating_duration_since(now))) {
                        Ok(Ok(out)) => break Ok(out),
                        Ok(Err(e)) => break Err(failed(format!("cannot read its output: {e}"))),
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                            break Err(failed("its output reader stopped".into()));
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            if cancel.is_set() {
                                break Err(FilterError::Cancelled);
                            }
                            if Instant::now() >= deadline {
                                break Err(FilterError::Timeout {
                                    setting: self.setting,
                                    limit_secs: self.timeout.as_secs_f64(),
                                });
                            }
                        }
                    }
                },
                (Err(e), _) | (_, Err(e)) => Err(failed(format!("cannot start a thread: {e}"))),
            };
            if outcome.is_err() {
                // Also ends the helpers: the pipes close with the child.
                let _ = child.kill();
            }
            outcome
        });
        let status = child.wait();
        let out = outcome?;
        let status = status.map_err(|e| failed(format!("cannot wait for it: {e}")))?;
        parse_output(expression, &out).map_err(|reason| {
            failed(if status.success() { reason } else { format!("{reason} (it ended with {status})") })
        })?
    }
}

/// The child's side: reads the expression from `input`, compiles it with libpcap, writes the
/// outcome to `output`. Returns whether libpcap compiled it.
pub fn run_child(input: impl Read, mut output: impl Write) -> std::io::Result<bool> {
    let mut bytes = Vec::new();
    input.take(CHILD_MAX_INPUT + 1).read_to_end(&mut bytes)?;
    let reply = if bytes.len() as u64 > CHILD_MAX_INPUT {
        format!("fail\nthe expression is over {CHILD_MAX_INPUT} bytes\n")
    } else {
        match std::str::from_utf8(&bytes).map_err(|_| "the expression is not UTF-8".to_owned()) {
            Err(reason) => format!("fail\n{reason}\n"),
            Ok(expression) => match CbpfProgram::compile(expression) {
                Ok(program) => {
                    let mut reply = String::from("ok\n");
                    for i in program.instructions() {
                        reply.push_str(&format!("{} {} {} {}\n", i.code, i.jt, i.jf, i.k));
                    }
                    reply
                }
                Err(FilterError::Syntax { message, .. }) => format!("error\n{message}"),
                Err(other) => format!("fail\n{other}\n"),
            },
        }
    };
    output.write_all(reply.as_bytes())?;
    output.flush()?;
    Ok(reply.starts_with("ok\n"))
}

/// What the child wrote: the program, libpcap's refusal, or why the output is not understood
/// (`Err` of the outer result).
fn parse_output(expression: &str, out: &[u8]) -> Result<Result<CbpfProgram, FilterError>, String> {
    let text = std::str::from_utf8(out).map_err(|_| "its output is not UTF-8".to_owned())?;
    let (head, rest) = text.split_once('\n').ok_or_else(|| format!("incomplete output {text:?}"))?;
    match head {
        "ok" => {
            let insns = rest
                .lines()
                .map(|line| parse_insn(line).ok_or_else(|| format!("not an instruction: {line:?}")))
                .collect::<Result<Vec<_>, _>>()?;
            if insns.is_empty() {
                return Err("a program without instructions".into());
            }
            Ok(Ok(CbpfProgram::from_instructions(expression, insns)))
        }
        "error" => {
            Ok(Err(FilterError::Syntax { expression: expression.to_owned(), message: rest.to_owned() }))
        }
        "fail" => Err(rest.trim_end().to_owned()),
        _ => Err(format!("unexpected output {:?}", &text[..text.len().min(200)])),
    }
}

/// `code jt jf k`, in decimal.
fn parse_insn(line: &str) -> Option<BpfInsn> {
    let mut fields = line.split(' ');
    let insn = BpfInsn {
        code: fields.next()?.parse().ok()?,
        jt: fields.next()?.parse().ok()?,
        jf: fields.next()?.parse().ok()?,
        k: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some(insn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compiler that runs `script` with sh (after reading its input).
    fn fake(script: &str, timeout: Duration) -> BoundedCompiler {
        BoundedCompiler::with_program("sh", ["-c", script], timeout, "limits.filter_compile_timeout_secs")
    }

    fn run_in_process(expression: &str) -> Result<CbpfProgram, FilterError> {
        let mut out = Vec::new();
        run_child(expression.as_bytes(), &mut out).unwrap();
        parse_output(expression, &out).unwrap()
    }

    #[test]
    fn the_child_protocol_carries_the_program_and_libpcaps_message() {
        for expression in ["tcp port 443 and net 10.0.0.0/8", "vlan and udp", "", "ip6 and not icmp6"] {
            assert_eq!(run_in_process(expression).unwrap(), CbpfProgram::compile(expression).unwrap());
        }
        for expression in ["tcp port", "host 999.1.1.1", "ip broadcast"] {
            let ours = run_in_process(expression).unwrap_err().to_string();
            let theirs = CbpfProgram::compile(expression).unwrap_err().to_string();
            assert_eq!(ours, theirs, "libpcap's words, verbatim");
        }
        let mut out = Vec::new();
        assert!(!run_child(&[0xff, 0xfe][..], &mut out).unwrap());
        assert!(parse_output("?", &out).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn the_childs_answer_is_read_whatever_it_is() {
        let never = Shutdown::new();
        let t = Duration::from_secs(20);
        let program =
            fake("cat >/dev/null; printf 'ok\\n6 0 0 262144\\n'", t).compile("tcp", &never).unwrap();
        assert_eq!(program.instructions(), [BpfInsn { code: 6, jt: 0, jf: 0, k: 262_144 }]);
        assert_eq!(program.expression(), "tcp");
        let err =
            fake("cat >/dev/null; printf 'error\\nsyntax error'", t).compile("tcp port", &never).unwrap_err();
        assert_eq!(err.to_string(), "invalid filter \"tcp port\": syntax error");
        for script in [
            "cat >/dev/null; printf 'ok\\n6 0 x\\n'",
            "cat >/dev/null; printf 'ok\\n'",
            "cat >/dev/null; printf 'garbage'",
            "cat >/dev/null; kill -9 $$",
        ] {
            let err = fake(script, t).compile("tcp", &never).unwrap_err();
            assert!(matches!(err, FilterError::CompilerFailed { .. }), "{script}: {err:?}");
        }
        let err = BoundedCompiler::with_program("/nonexistent/tapstream", CHILD_ARGS, t, "x")
            .compile("tcp", &never)
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tapstream"), "{err}");
        assert!(matches!(fake("cat", t).compile("a\0b", &never), Err(FilterError::Nul)));
    }

    #[test]
    fn a_compile_past_the_time_limit_is_killed_and_named() {
        let never = Shutdown::new();
        // The child writes its pid, then hangs (without reading its input).
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
        let start = Instant::now();
        let err = fake(&script, Duration::from_secs(1)).compile(&"x".repeat(200_000), &never).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(30), "refused after {:?}", start.elapsed());
        assert!(start.elapsed() >= Duration::from_secs(1));
        assert!(matches!(err, FilterError::Timeout { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the filter did not compile within the server's limits.filter_compile_timeout_secs = 1: \
             the compile was abandoned (long lists of hosts or ports compile slowly; shorten the filter)"
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(!std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(), "the child is gone");
    }

    #[test]
    fn a_cancelled_compile_ends_at_once() {
        let cancel = Shutdown::new();
        let start = Instant::now();
        let err = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                cancel.trigger();
            });
            fake("exec sleep 600", Duration::from_secs(600)).compile("tcp", &cancel).unwrap_err()
        });
        assert!(matches!(err, FilterError::Cancelled), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(30), "ended after {:?}", start.elapsed());
    }

    /// A burst of compiles runs one a core at a time, and a compile's wait for its turn does
    /// not count against its time limit.
    #[test]
    fn a_burst_of_compiles_takes_turns_and_waiting_is_not_running() {
        let never = Shutdown::new();
        let dir = tempfile::tempdir().unwrap();
        let running = dir.path().join("running");
        std::fs::create_dir(&running).unwrap();
        let seen = dir.path().join("seen");
        // Each child marks itself running, records how many are, runs 300 ms, and answers.
        let script = format!(
            "cat >/dev/null; mkdir {r}/$$; ls {r} | wc -l >> {s}; sleep 0.3; rmdir {r}/$$; \
             printf 'ok\\n6 0 0 262144\\n'",
            r = running.display(),
            s = seen.display()
        );
        // Each compile may run 2 s: three rounds of waiting would exceed it if they counted.
        let compiler = fake(&script, Duration::from_secs(2));
        let places = sys::online_cores();
        let compiles = places * 8;
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..compiles).map(|_| s.spawn(|| compiler.compile("tcp", &never))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let counts: Vec<usize> =
            std::fs::read_to_string(&seen).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(counts.len(), compiles);
        assert!(counts.iter().all(|&n| n <= places), "{places} at most at once: {counts:?}");
    }

    #[test]
    fn lengths_over_the_bound_are_refused_naming_it() {
        assert!(check_length("tcp", 3, "the CLI's bound").is_ok());
        let err = check_length("tcp ", 3, "the CLI's bound").unwrap_err();
        assert_eq!(err.to_string(), "the filter expression is 4 bytes, over the CLI's bound (3 bytes)");
        assert!(check_length(&"x".repeat(CLI_MAX_FILTER_BYTES), CLI_MAX_FILTER_BYTES, "b").is_ok());
    }
}
