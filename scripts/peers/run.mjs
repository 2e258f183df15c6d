// One round of a peer job queue for scripts/bench-peers: enqueue TASKS no-op jobs, then time
// workers holding IN_FLIGHT jobs at once until every job completed. Prints one JSON object:
// tasks/s and CPU milliseconds per task of this process (the library inside the worker) and of
// PostgreSQL's processes, read from /proc as leasehold's bench reads them.
//
//   node run.mjs <pg-boss|graphile|graphile-batched> <database-url> <tasks> <in-flight>

import { readFileSync, readdirSync } from "node:fs";

const [system, databaseUrl, tasksText, inFlightText] = process.argv.slice(2);
const tasks = Number(tasksText);
const inFlight = Number(inFlightText);
const TICKS_PER_SECOND = 100;

function postgresCpuSeconds() {
  let ticks = 0;
  for (const pid of readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
    try {
      if (readFileSync(`/proc/${pid}/comm`, "utf8").trim() !== "postgres") continue;
      const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // The process ended meanwhile.
    }
  }
  return ticks / TICKS_PER_SECOND;
}

function ownCpuSeconds() {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) / 1e6;
}

/// Runs `work` (which resolves once every job completed) between two CPU readings.
async function measured(work) {
  const before = { postgres: postgresCpuSeconds(), own: ownCpuSeconds(), at: performance.now() };
  await work();
  const seconds = (performance.now() - before.at) / 1000;
  const perTask = (cpuSeconds) => (cpuSeconds * 1000) / tasks;
  const postgres = perTask(postgresCpuSeconds() - before.postgres);
  const client = perTask(ownCpuSeconds() - before.own);
  return {
    system,
    tasks,
    in_flight: inFlight,
    seconds,
    tasks_per_second: tasks / seconds,
    cpu_ms_per_task: { client, postgres, total: client + postgres },
  };
}

async function pgBoss() {
  const { PgBoss } = await import("pg-boss");
  const boss = new PgBoss({ connectionString: databaseUrl, max: 20 });
  boss.on("error", (error) => console.error(error));
  await boss.start();
  await boss.createQueue("bench");
  for (let sent = 0; sent < tasks; sent += 1000) {
    const size = Math.min(1000, tasks - sent);
    await boss.insert("bench", Array.from({ length: size }, () => ({ data: {} })));
  }
  const workers = 16;
  const batchSize = Math.max(1, Math.floor(inFlight / workers));
  const result = await measured(
    () =>
      new Promise((resolve) => {
        let done = 0;
        for (let worker = 0; worker < workers; worker++) {
          boss.work("bench", { batchSize, pollingIntervalSeconds: 0.5, burstWhenBatchFull: true }, async (jobs) => {
            done += jobs.length;
            if (done >= tasks) resolve();
          });
        }
      }),
  );
  await boss.stop({ graceful: false, wait: false });
  return result;
}

async function graphile(batched) {
  const { run, makeWorkerUtils, Logger } = await import("graphile-worker");
  // Silent: its per-job log lines would cost CPU the others do not spend, and mix with the JSON.
  const logger = new Logger(() => () => {});
  const utils = await makeWorkerUtils({ connectionString: databaseUrl, logger });
  await utils.migrate();
  for (let sent = 0; sent < tasks; sent += 1000) {
    const size = Math.min(1000, tasks - sent);
    await utils.addJobs(Array.from({ length: size }, () => ({ identifier: "bench", payload: {} })));
  }
  await utils.release();
  let done = 0;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const preset = batched
    ? { worker: { localQueue: { size: inFlight }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
    : undefined;
  let runner;
  const result = await measured(async () => {
    runner = await run({
      connectionString: databaseUrl,
      concurrency: inFlight,
      noHandleSignals: true,
      logger,
      pollInterval: 500,
      preset,
      taskList: {
        bench: async () => {
          done += 1;
          if (done >= tasks) finish();
        },
      },
    });
    await finished;
  });
  await runner.stop();
  return result;
}

const runs = {
  "pg-boss": pgBoss,
  graphile: () => graphile(false),
  "graphile-batched": () => graphile(true),
};
console.log(JSON.stringify(await runs[system]()));
process.exit(0);
