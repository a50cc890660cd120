// A producer that is not our Python code: node-redis sends every operation on the command
// stream (docs/jobs.md) and follows the firehose for what became of each request. The round
// trip: create -> session.ready -> exec (its output) -> stop -> start -> delete.
//
// Environment: REDIS_HOST, REDIS_PORT, REDIS_USER, REDIS_PASSWORD, PREFIX (the key prefix),
// TIMEOUT_MS. Prints one JSON line: what it saw, for the test to check. Exits 1 on a failure.
import { createClient } from "redis";

const prefix = process.env.PREFIX ?? "orchestrator:";
const commands = `${prefix}commands`;
const firehose = `${prefix}events`;
const deadline = Date.now() + Number(process.env.TIMEOUT_MS ?? 180000);
const tag = `node-${process.pid}`;

const client = createClient({
  socket: { host: process.env.REDIS_HOST ?? "127.0.0.1", port: Number(process.env.REDIS_PORT ?? 6379) },
  username: process.env.REDIS_USER,
  password: process.env.REDIS_PASSWORD,
  disableClientInfo: true, // no CLIENT SETINFO: the producer's ACL user has nothing but its own
});
client.on("error", (err) => console.error("redis:", err.message));

// Where the firehose is now: every answer comes after it.
let cursor = "0-0";
const seen = [];

async function send(command) {
  return client.xAdd(commands, "*", { command: JSON.stringify(command) });
}

// The next event for `requestId` whose type is one of `types` (others are kept in `seen`).
async function waitFor(requestId, types) {
  for (;;) {
    const hit = seen.find((e) => e.data?.request_id === requestId && types.includes(e.type));
    if (hit) {
      seen.splice(seen.indexOf(hit), 1);
      return hit;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${types} of ${requestId}`);
    const reply = await client.xRead({ key: firehose, id: cursor }, { BLOCK: 1000, COUNT: 500 });
    for (const stream of reply ?? []) {
      for (const { id, message } of stream.messages) {
        cursor = id;
        seen.push(JSON.parse(message.event));
      }
    }
  }
}

// Answered, or why not.
async function accepted(requestId) {
  const answer = await waitFor(requestId, ["command.accepted", "command.rejected"]);
  if (answer.type !== "command.accepted") throw new Error(`${requestId} rejected: ${JSON.stringify(answer.data)}`);
  return answer.data;
}

async function main() {
  await client.connect();
  const last = await client.xRevRange(firehose, "+", "-", { COUNT: 1 });
  cursor = last.length ? last[0].id : "0-0";
  const out = {};

  await send({ op: "create", request_id: `${tag}-create`, labels: { producer: "node" } });
  const created = await accepted(`${tag}-create`);
  const session = created.session;
  out.session = session;
  out.create = created;
  out.ready = (await waitFor(`${tag}-create`, ["session.ready", "session.failed"])).type;

  await send({ op: "exec", request_id: `${tag}-exec`, session, shell: "echo from-node; exit 3" });
  const exec = await accepted(`${tag}-exec`);
  const exited = await waitFor(`${tag}-exec`, ["exec.exited"]);
  out.exit_code = exited.data.exit_code;
  const output = await client.xRange(`${prefix}exec-output:${exec.exec}`, "-", "+");
  out.stdout = output.filter((e) => e.message.s === "stdout").map((e) => e.message.d).join("");

  for (const [op, state] of [["stop", "session.stopped"], ["start", "session.ready"], ["delete", "session.deleted"]]) {
    await send({ op, request_id: `${tag}-${op}`, session });
    await accepted(`${tag}-${op}`);
    out[op] = (await waitFor(`${tag}-${op}`, [state, "session.failed"])).type;
  }
  console.log(JSON.stringify(out));
}

main()
  .then(() => client.quit())
  .catch(async (err) => {
    console.error(err.stack ?? String(err));
    process.exitCode = 1;
    try {
      await client.quit();
    } catch {}
  });
