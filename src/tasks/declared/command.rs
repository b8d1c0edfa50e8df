//! `kind = "command"`: one attempt is one run of a program.
//!
//! The program (`argv`, no shell) gets the invocation JSON on its stdin and a bare environment —
//! `PATH` and the variables the file lists in `env`, nothing of Kobe's own. Its stdout is the
//! result (JSON when it parses, text otherwise) and is capped at `max_output_bytes`; the exit
//! status decides the outcome: 0 is `SUCCESS`, 75 (`EX_TEMPFAIL`) a retry, anything else a
//! `FAILURE` with the tail of its stderr as the root cause.
//!
//! It runs in a process group of its own. At the soft time limit, or when the task is cancelled,
//! the group gets `SIGTERM`; at
//! `time_limit_s` the worker abandons the attempt (a `FAILURE`, as for any task) and the group
//! gets `SIGKILL`. When the program exits,
//! whatever it left running in its group is killed too, so no attempt leaves an orphan behind.
//!
//! That holds when the worker itself dies without a word (`kill -9`, the OOM killer): each group
//! holds a watchdog, a forked copy of the program's process that does nothing but wait on a pipe
//! whose writing end only the worker holds. The kernel closes it when the worker dies, and the
//! watchdog kills the group — so the attempt a later worker takes over never runs beside an
//! orphan of the one before.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::fields::{excerpt, field, FieldError};
use crate::config::Secret;
use crate::tasks::{HandlerResult, Invocation, TaskError};

/// The exit status that asks for a retry (`EX_TEMPFAIL` of sysexits.h).
pub(crate) const EXIT_RETRY: i32 = 75;
/// Stdout kept by default.
const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// Bytes of stderr kept for the root cause.
const STDERR_TAIL: usize = 2048;

/// A declared program.
pub(crate) struct Program {
    argv: Vec<String>,
    env: Vec<(String, Secret<String>)>,
    cwd: Option<PathBuf>,
    max_output: usize,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("Program")
            .field("argv", &self.argv)
            .field("env", &names)
            .field("cwd", &self.cwd)
            .finish_non_exhaustive()
    }
}

/// The reading end of the worker's life line: a pipe whose writing end this process keeps open
/// until it dies (both ends close on exec, so no program inherits them). Made once.
fn life_line() -> std::io::Result<libc::c_int> {
    static LINE: std::sync::OnceLock<Result<libc::c_int, i32>> = std::sync::OnceLock::new();
    let line = LINE.get_or_init(|| {
        let mut ends = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given, which has two.
        let made = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
        if made != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // The writing end is never closed: it lives exactly as long as the process.
        Ok(ends[0])
    });
    line.map_err(std::io::Error::from_raw_os_error)
}

/// In the program's process, between fork and exec (its own group already): forks the watchdog,
/// which keeps only the life line, waits for it to close, and kills the group. Only
/// async-signal-safe calls (fork, close, read, kill, _exit) happen here.
fn fork_watchdog(line: libc::c_int) -> std::io::Result<()> {
    // SAFETY: called in the single-threaded child between fork and exec; the watchdog branch
    // makes only async-signal-safe system calls and never returns.
    unsafe {
        let group = libc::getpid();
        match libc::fork() {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                // Nothing of the program's: its pipes must close when it exits, and the
                // writing end of the line (inherited through fork) must not keep it open.
                for fd in 0..line {
                    libc::close(fd);
                }
                libc::syscall(libc::SYS_close_range, line + 1, libc::c_uint::MAX, 0);
                let mut byte = 0u8;
                loop {
                    let read = libc::read(line, (&mut byte as *mut u8).cast(), 1);
                    if read == 0 || (read < 0 && *libc::__errno_location() != libc::EINTR) {
                        break;
                    }
                }
                libc::kill(-group, libc::SIGKILL);
                libc::_exit(0)
            }
            _ => Ok(()),
        }
    }
}

/// Kills a process group when dropped: the attempt ended, or was abandoned.
struct Group(libc::pid_t);

impl Group {
    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) takes plain integers and touches no memory; a group that is gone
        // already makes it fail with ESRCH, which is fine.
        unsafe {
            libc::kill(-self.0, signal);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

impl Program {
    pub(super) fn new(
        argv: Vec<String>,
        env: &[String],
        cwd: Option<PathBuf>,
        max_output: Option<usize>,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, FieldError> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(field(
                "argv",
                "expected the program and its arguments, as a list",
            ));
        }
        let mut passed = Vec::new();
        for name in env {
            let value = lookup(name)
                .ok_or_else(|| field("env", format!("the variable {name} is not set")))?;
            passed.push((name.clone(), Secret::new(value)));
        }
        let max_output = match max_output {
            Some(0) => return Err(field("max_output_bytes", "expected at least 1 byte")),
            Some(n) => n,
            None => DEFAULT_MAX_OUTPUT,
        };
        Ok(Self {
            argv,
            env: passed,
            cwd,
            max_output,
        })
    }

    /// One attempt: run the program to its end (or its limit) and read its verdict.
    pub(super) async fn run(&self, invocation: Invocation, body: &Value) -> HandlerResult {
        let input = serde_json::to_vec(body)
            .map_err(|e| TaskError::Permanent(format!("cannot encode the input: {e}")))?;
        let mut command = self.command();
        let program = &self.argv[0];
        let mut child = command
            .spawn()
            .map_err(|e| TaskError::Permanent(format!("cannot start `{program}`: {e}")))?;
        let group = Group(child.id().map_or(0, |id| id as libc::pid_t));
        let stdin = child.stdin.take();
        tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read its input closes the pipe: that is its business.
                let _ = stdin.write_all(&input).await;
            }
        });
        let stdout = tokio::spawn(read_up_to(child.stdout.take(), self.max_output));
        let stderr = tokio::spawn(read_tail(child.stderr.take(), STDERR_TAIL));

        // The hard limit is the worker's: it abandons this future, and dropping `group` kills.
        let mut terminated = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = invocation.wrap_up(), if !terminated => {
                    terminated = true;
                    group.signal(libc::SIGTERM);
                }
            }
        };
        // Whatever the program left running goes with it, and its pipes close.
        drop(group);
        let (stdout, overflowed) = stdout.await.unwrap_or_default();
        let stderr = stderr.await.unwrap_or_default();
        let tail = excerpt(String::from_utf8_lossy(&stderr).trim(), STDERR_TAIL);
        let status = status
            .map_err(|e| TaskError::Retryable(format!("cannot wait for `{program}`: {e}")))?;
        self.verdict(status, terminated, &stdout, overflowed, &tail)
    }

    /// The program as it is started: its arguments, only the variables it was given (and `PATH`),
    /// its own process group so a kill reaches whatever it started.
    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        for (name, value) in &self.env {
            command.env(name, value.expose());
        }
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        if let Ok(line) = life_line() {
            // SAFETY: the closure runs between fork and exec and only calls fork_watchdog, which
            // keeps to async-signal-safe calls.
            unsafe {
                command.pre_exec(move || fork_watchdog(line));
            }
        }
        command
    }

    /// What the program's exit says: its stdout (JSON, else text) on 0, a retry on
    /// [`EXIT_RETRY`], a failure with the end of its stderr otherwise.
    fn verdict(
        &self,
        status: std::process::ExitStatus,
        terminated: bool,
        stdout: &[u8],
        overflowed: bool,
        tail: &str,
    ) -> HandlerResult {
        let program = &self.argv[0];
        match status.code() {
            Some(0) if overflowed => Err(TaskError::Permanent(format!(
                "`{program}` wrote more than {} bytes to stdout",
                self.max_output
            ))),
            Some(0) => {
                let text = String::from_utf8_lossy(stdout);
                let text = text.trim();
                Ok(serde_json::from_str(text).unwrap_or_else(|_| {
                    if text.is_empty() {
                        Value::Null
                    } else {
                        Value::String(text.to_owned())
                    }
                }))
            }
            Some(EXIT_RETRY) => Err(TaskError::Retryable(format!(
                "`{program}` asked for a retry (exit {EXIT_RETRY}): {tail}"
            ))),
            Some(code) => Err(TaskError::Permanent(format!(
                "`{program}` exited with {code}: {tail}"
            ))),
            None => {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal().unwrap_or_default();
                let when = if terminated {
                    " after the soft time limit"
                } else {
                    ""
                };
                Err(TaskError::Permanent(format!(
                    "`{program}` was killed by signal {signal}{when}: {tail}"
                )))
            }
        }
    }
}

/// Reads a pipe to its end, keeping at most `cap` bytes; `true` when there was more.
async fn read_up_to(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut overflowed = false;
    let Some(mut pipe) = pipe else {
        return (kept, overflowed);
    };
    let mut buffer = [0_u8; 8192];
    while let Ok(n) = pipe.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..n.min(room)]);
        overflowed |= n > room;
    }
    (kept, overflowed)
}

/// Reads a pipe to its end, keeping its last `cap` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else {
        return tail;
    };
    let mut buffer = [0_u8; 8192];
    while let Ok(n) = pipe.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buffer[..n]);
        if tail.len() > cap {
            tail.drain(..tail.len() - cap);
        }
    }
    tail
}
