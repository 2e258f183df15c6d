//! Where the CPU time of a scenario goes: the server process, PostgreSQL's processes, Redis
//! and the bench client itself, from /proc (Linux). The machine has few cores, so whoever burns them
//! sets the pace; this is the cheap profile every run carries.

use serde_json::{Value, json};

/// Clock ticks per second of /proc/*/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CpuTimes {
    server: f64,
    postgres: f64,
    redis: f64,
    client: f64,
}

impl CpuTimes {
    pub(super) fn now(server_pid: Option<u32>) -> CpuTimes {
        CpuTimes {
            server: server_pid.and_then(process_seconds).unwrap_or(0.0),
            postgres: seconds_of_processes_named("postgres"),
            redis: seconds_of_processes_named("redis-server"),
            client: process_seconds(std::process::id()).unwrap_or(0.0),
        }
    }

    /// CPU milliseconds per task since `earlier`: the server's, PostgreSQL's and their sum
    /// (the bench client's own work is left out: in a deployment it is the workers').
    pub(super) fn per_task(&self, earlier: &CpuTimes, tasks: usize) -> Value {
        let per_task = |seconds: f64| seconds * 1000.0 / tasks.max(1) as f64;
        let server = self.server - earlier.server;
        let postgres = self.postgres - earlier.postgres;
        json!({
            "server": per_task(server),
            "postgres": per_task(postgres),
            "total": per_task(server + postgres),
        })
    }

    /// CPU seconds spent by each side since `earlier`.
    pub(super) fn since(&self, earlier: &CpuTimes) -> Value {
        json!({
            "server_s": self.server - earlier.server,
            "postgres_s": self.postgres - earlier.postgres,
            "redis_s": self.redis - earlier.redis,
            "bench_client_s": self.client - earlier.client,
        })
    }
}

/// User + system CPU seconds of one process (fields 14 and 15 of /proc/PID/stat).
fn process_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are space-separated.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / TICKS_PER_SECOND)
}

/// CPU seconds of every live process called `name` (PostgreSQL backends that exited since are
/// missed, which undercounts short connections; the servers keep pooled ones).
fn seconds_of_processes_named(name: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|command| command.trim() == name)
        })
        .filter_map(process_seconds)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_time() {
        let spent = process_seconds(std::process::id());
        assert!(spent.is_some_and(|seconds| seconds >= 0.0));
    }
}
