// A coolfusion client in Node.js, built from the .proto files alone: the proof that the protocol is
// language-agnostic (no generated Python, no shared code with the servers).
//
// Usage:
//   node call.mjs ORCHESTRATOR_ADDRESS WORKER_ADDRESS [--prompt TEXT] [--max-new-tokens N]
//                 [--deadline-ms MS] [--empty-prompt]
//
// Normal mode: WorkerService.GetInfo on the worker, then OrchestratorService.Fuse on the
// orchestrator; prints one JSON object and exits 0, or exits non-zero on any error.
// --empty-prompt: sends a Fuse request with an empty prompt, which the orchestrator must reject;
// prints {"error": {code, name, details}} and exits 0 only when the call failed with a gRPC status.

import path from "node:path";
import { fileURLToPath } from "node:url";
import process from "node:process";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(HERE, "..", "..", "protos");
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

function parseArgs(argv) {
  const options = { prompt: "Tom has 3 apples and buys 4 more.", maxNewTokens: 12, deadlineMs: 60000, emptyPrompt: false };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--prompt") options.prompt = value();
    else if (arg === "--max-new-tokens") options.maxNewTokens = Number.parseInt(value(), 10);
    else if (arg === "--deadline-ms") options.deadlineMs = Number.parseInt(value(), 10);
    else if (arg === "--empty-prompt") options.emptyPrompt = true;
    else if (arg.startsWith("--")) throw new Error(`unknown option ${arg}`);
    else positional.push(arg);
  }
  if (positional.length !== 2) {
    throw new Error("usage: node call.mjs ORCHESTRATOR_ADDRESS WORKER_ADDRESS [options]");
  }
  [options.orchestrator, options.worker] = positional;
  return options;
}

function loadServices() {
  const definition = protoLoader.loadSync(["coolfusion/v1/orchestrator.proto", "coolfusion/v1/worker.proto"], {
    includeDirs: [PROTOS],
    keepCase: true, // field names exactly as in the .proto files
    enums: String, // enum values by name, e.g. "FINISH_REASON_EOS"
    longs: String, // uint64 load counters without precision loss
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).coolfusion.v1;
  return { WorkerService: v1.WorkerService, OrchestratorService: v1.OrchestratorService };
}

// Calls a unary method with a deadline; resolves with the response or rejects with the gRPC error.
function unary(client, method, request, deadlineMs) {
  const deadline = new Date(Date.now() + deadlineMs);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function fuseRequest(prompt, maxNewTokens) {
  return { parameters: { prompt: { text: prompt }, max_new_tokens: maxNewTokens } };
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const { WorkerService, OrchestratorService } = loadServices();
  const credentials = grpc.credentials.createInsecure();
  const orchestrator = new OrchestratorService(options.orchestrator, credentials);

  if (options.emptyPrompt) {
    try {
      const response = await unary(orchestrator, "Fuse", fuseRequest("", options.maxNewTokens), options.deadlineMs);
      console.error(`expected a rejection, got an answer: ${JSON.stringify(response)}`);
      return 1;
    } catch (error) {
      if (typeof error.code !== "number") throw error; // not a gRPC status: a bug in this script
      const name = STATUS_NAMES[error.code] ?? "UNKNOWN_CODE";
      console.log(JSON.stringify({ error: { code: error.code, name, details: error.details } }));
      return 0;
    } finally {
      orchestrator.close();
    }
  }

  const worker = new WorkerService(options.worker, credentials);
  try {
    const info = await unary(worker, "GetInfo", {}, options.deadlineMs);
    const fused = await unary(
      orchestrator,
      "Fuse",
      fuseRequest(options.prompt, options.maxNewTokens),
      options.deadlineMs,
    );
    const result = fused.result;
    console.log(
      JSON.stringify({
        model_id: info.model_id,
        protocol_version: info.protocol_version,
        text: result.text,
        finish_reason: result.finish_reason,
        shares: result.shares.map((s) => ({ worker: s.worker, segments: s.segments, chars: s.chars })),
        request_id: result.request_id,
      }),
    );
    return 0;
  } finally {
    worker.close();
    orchestrator.close();
  }
}

main().then(
  (code) => process.exit(code),
  (error) => {
    const status = typeof error.code === "number" ? ` (${STATUS_NAMES[error.code] ?? error.code})` : "";
    console.error(`call.mjs failed${status}: ${error.details ?? error.message}`);
    process.exit(2);
  },
);
