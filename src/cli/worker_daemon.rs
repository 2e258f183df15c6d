//! `leasehold worker … -- CMD [ARGS]`: a ready daemon on the SDK that runs `CMD` once per task.
//!
//! The child gets the payload on stdin and the task in its environment (`LEASEHOLD_TASK_ID`,
//! `LEASEHOLD_TASK_ATTEMPT`, `LEASEHOLD_TASK_MAX_ATTEMPTS`, `LEASEHOLD_TASK_QUEUE`,
//! `LEASEHOLD_TASK_METADATA` as a JSON object, and each metadata entry as
//! `LEASEHOLD_META_<KEY>`). Exit 0 completes the task with stdout as its result; any other exit
//! fails it with the tail of stderr, retryable unless the code is a `--permanent-exit-code`.
//! A cancelled task's child gets SIGTERM, then SIGKILL after `--kill-grace`.

use std::collections::{HashMap, VecDeque};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use clap::{Args, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{ServerArgs, key_value};
use crate::client::{ClaimMode, Handler, TaskContext, TaskError, Worker, WorkerConfig};
use crate::telemetry::LogFormat;
use crate::{shutdown, telemetry};

/// How much of a failed child's stderr becomes the task's error.
const STDERR_TAIL_BYTES: usize = 4096;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// A queue to serve; repeatable.
    #[arg(long = "queue", required = true)]
    queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "LEASEHOLD_CONCURRENCY", default_value_t = 1)]
    concurrency: u32,
    /// Runtime name, unique per live daemon. Keep it stable across restarts (a pod or host
    /// name) so a restarted daemon recovers what it held; default: `<hostname>-<pid>`.
    #[arg(long, env = "LEASEHOLD_WORKER_NAME")]
    name: Option<String>,
    /// KEY=VALUE runtime label; repeatable.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// An exit code that means "do not retry"; repeatable.
    #[arg(long = "permanent-exit-code")]
    permanent_exit_codes: Vec<i32>,
    /// After SIGTERM, how long a cancelled task's child has before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// On SIGTERM/SIGINT, how long in-flight tasks may finish before they are cancelled.
    #[arg(long, env = "LEASEHOLD_WORKER_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// The most of a command's stdout kept as its result (the server's --max-payload-bytes);
    /// a command that prints more fails its task, not retried, rather than fill this daemon's
    /// memory or be refused by the server.
    #[arg(long, env = "LEASEHOLD_MAX_RESULT_BYTES", default_value_t = 1024 * 1024)]
    max_result_bytes: usize,
    /// Streamed claims (default), or long-poll `ClaimTask` for proxies without bidi streams.
    #[arg(long, value_enum, default_value_t = ClaimModeArg::Stream)]
    claim_mode: ClaimModeArg,
    /// Streamed claims arrive started (no StartTask per task: one write fewer). The command
    /// runs at once either way; this only saves the round trip.
    #[arg(long, env = "LEASEHOLD_AUTO_START")]
    auto_start: bool,
    /// Report finished tasks on the claim stream rather than by a call each (needs servers of
    /// this release or later: an older one ends a stream that carries a write).
    #[arg(long, env = "LEASEHOLD_WRITES_ON_STREAM")]
    writes_on_stream: bool,
    #[arg(long, env = "LEASEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// The program to run per task, and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ClaimModeArg {
    Stream,
    Unary,
}

impl WorkerArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        telemetry::init_stderr(self.log_format);
        let client = self.server.client()?;
        let mut config = WorkerConfig::new(
            self.name.clone().unwrap_or_else(default_name),
            self.queues.clone(),
        )
        .concurrency(self.concurrency)
        .auto_start(self.auto_start)
        .writes_on_stream(self.writes_on_stream)
        .shutdown_grace(self.shutdown_grace)
        .claim_mode(match self.claim_mode {
            ClaimModeArg::Stream => ClaimMode::Stream,
            ClaimModeArg::Unary => ClaimMode::Unary,
        });
        config.labels = self.labels.iter().cloned().collect();
        let (program, arguments) = self
            .command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("no command to run"))?;
        let handler = CommandHandler {
            program: program.clone(),
            arguments: arguments.to_vec(),
            permanent_exit_codes: self.permanent_exit_codes.clone(),
            kill_grace: self.kill_grace,
            max_result_bytes: self.max_result_bytes,
        };
        let stop = CancellationToken::new();
        let stop_on_signal = stop.clone();
        tokio::spawn(async move {
            shutdown::signal().await;
            stop_on_signal.cancel();
        });
        Worker::new(client, config, handler)
            .run(stop)
            .await
            .map_err(super::rpc_error)
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Runs one child process per task.
struct CommandHandler {
    program: String,
    arguments: Vec<String>,
    permanent_exit_codes: Vec<i32>,
    kill_grace: Duration,
    max_result_bytes: usize,
}

#[async_trait]
impl Handler for CommandHandler {
    async fn run(&self, task: &TaskContext) -> Result<Vec<u8>, TaskError> {
        let mut child = Command::new(&self.program)
            .args(&self.arguments)
            .envs(task_environment(task.task()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                TaskError::retryable(format!("cannot start {}: {error}", self.program))
            })?;
        let payload = task.task().payload.clone();
        let stdin = child.stdin.take();
        let feed = tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                // A child that does not read its stdin closes the pipe early; that is fine.
                let _ = stdin.write_all(&payload).await;
            }
        });
        let stdout = tokio::spawn(read_capped(child.stdout.take(), self.max_result_bytes));
        let stderr = tokio::spawn(read_tail(child.stderr.take(), STDERR_TAIL_BYTES));
        let status = tokio::select! {
            status = child.wait() => status,
            () = task.cancelled().cancelled() => terminate(&mut child, self.kill_grace).await,
        }
        .map_err(|error| TaskError::retryable(format!("waiting for the child failed: {error}")))?;
        let _ = feed.await;
        let stdout = stdout.await.unwrap_or_default();
        let stderr = stderr.await.unwrap_or_default();
        self.outcome(status, stdout, &stderr)
    }
}

impl CommandHandler {
    fn outcome(
        &self,
        status: ExitStatus,
        (stdout, overflowed): (Vec<u8>, bool),
        stderr: &[u8],
    ) -> Result<Vec<u8>, TaskError> {
        if status.success() && overflowed {
            return Err(TaskError {
                message: format!(
                    "the command printed more than {} bytes on stdout, the most a result holds",
                    self.max_result_bytes
                ),
                retryable: false,
            });
        }
        if status.success() {
            return Ok(stdout);
        }
        let tail = String::from_utf8_lossy(stderr);
        let tail = tail.trim();
        match status.code() {
            Some(code) => Err(TaskError {
                message: format!("exit code {code}: {tail}"),
                retryable: !self.permanent_exit_codes.contains(&code),
            }),
            None => Err(TaskError::retryable(format!(
                "killed by a signal ({status}): {tail}"
            ))),
        }
    }
}

/// SIGTERM, then SIGKILL if the child is still there after `grace`.
async fn terminate(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            child.kill().await?;
            child.wait().await
        }
    }
}

fn task_environment(task: &crate::proto::Task) -> HashMap<String, String> {
    let mut environment = HashMap::from([
        ("LEASEHOLD_TASK_ID".to_owned(), task.id.clone()),
        ("LEASEHOLD_TASK_QUEUE".to_owned(), task.queue.clone()),
        (
            "LEASEHOLD_TASK_ATTEMPT".to_owned(),
            task.attempt.to_string(),
        ),
        (
            "LEASEHOLD_TASK_MAX_ATTEMPTS".to_owned(),
            task.max_attempts.to_string(),
        ),
        (
            "LEASEHOLD_TASK_METADATA".to_owned(),
            serde_json::to_string(&task.metadata).unwrap_or_else(|_| "{}".into()),
        ),
    ]);
    for (key, value) in &task.metadata {
        environment.insert(
            format!("LEASEHOLD_META_{}", environment_name(key)),
            value.clone(),
        );
    }
    environment
}

/// `content-type` → `CONTENT_TYPE`: what a shell can name.
fn environment_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads the pipe to its end (so the child never blocks on a full pipe), keeping at most
/// `keep` bytes; `true` when there was more.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, keep: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut overflowed = false;
    let Some(mut pipe) = pipe else {
        return (kept, overflowed);
    };
    let mut buffer = [0u8; 8192];
    while let Ok(read) = pipe.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        let room = keep.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..read.min(room)]);
        overflowed |= read > room;
    }
    (kept, overflowed)
}

/// Reads the pipe to its end, keeping only the last `keep` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, keep: usize) -> Vec<u8> {
    let mut tail = VecDeque::with_capacity(keep);
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut buffer = [0u8; 8192];
    while let Ok(read) = pipe.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        tail.extend(&buffer[..read]);
        let excess = tail.len().saturating_sub(keep);
        tail.drain(..excess);
    }
    tail.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stdout_is_kept_up_to_the_cap_and_read_to_its_end() {
        let text: &[u8] = b"0123456789";
        assert_eq!(read_capped(Some(text), 4).await, (b"0123".to_vec(), true));
        assert_eq!(read_capped(Some(text), 10).await, (text.to_vec(), false));
    }

    #[test]
    fn metadata_keys_become_shell_names() {
        assert_eq!(environment_name("content-type"), "CONTENT_TYPE");
        assert_eq!(environment_name("a.b9"), "A_B9");
    }

    #[tokio::test]
    async fn only_the_tail_of_a_long_stream_is_kept() {
        let text: Vec<u8> = (0..10_000u32).map(|n| b'a' + (n % 26) as u8).collect();
        let tail = read_tail(Some(&text[..]), 100).await;
        assert_eq!(tail, text[text.len() - 100..]);
    }

    #[test]
    fn exit_codes_marked_permanent_are_not_retried() {
        use std::os::unix::process::ExitStatusExt;
        let handler = CommandHandler {
            program: "true".into(),
            arguments: Vec::new(),
            permanent_exit_codes: vec![4],
            kill_grace: Duration::from_secs(1),
            max_result_bytes: 16,
        };
        let exit = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(
            handler.outcome(exit(0), (b"out".to_vec(), false), b""),
            Ok(b"out".to_vec())
        );
        let retryable = handler
            .outcome(exit(3), (Vec::new(), false), b"boom\n")
            .unwrap_err();
        assert_eq!(retryable, TaskError::retryable("exit code 3: boom"));
        let permanent = handler
            .outcome(exit(4), (Vec::new(), false), b"bad input")
            .unwrap_err();
        assert!(!permanent.retryable);
        let too_much = handler
            .outcome(exit(0), (b"0123456789abcdef".to_vec(), true), b"")
            .unwrap_err();
        assert!(!too_much.retryable);
    }
}
