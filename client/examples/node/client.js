#!/usr/bin/env node
// rnnserve from Node.js: streams Generate, then calls Score, printing one JSON object per line.
//
// The stubs are built at run time from the committed proto (no code generation), so this is
// what any language's client sees: the contract in proto/rnnserve/v1/rnnserve.proto.
//
//   npm install
//   node client.js --address localhost:50051 --model lstm --prompt "the time" \
//       --max-tokens 20 --score "the time traveller" [--token-file token.txt]
//
// Output lines: {"event":"token",...} per Generate message, then {"event":"score",...} per
// scored text. A gRPC error prints {"event":"error","code":"NOT_FOUND",...} to stderr and
// exits with the status number; bad flags print {"event":"error","code":"USAGE",...} and
// exit 64 (both as rnn-client does).
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = process.env.RNNSERVE_PROTO
  || path.resolve(__dirname, "../../../proto/rnnserve/v1/rnnserve.proto");

const EXIT_USAGE = 64; // as rnn-client: 1..16 are gRPC status numbers

const OPTIONS = {
  address: { type: "string", default: process.env.RNNSERVE_ADDRESS || "localhost:50051" },
  model: { type: "string", default: "lstm" },
  prompt: { type: "string", default: "the time" },
  "max-tokens": { type: "string", default: "20" },
  score: { type: "string", multiple: true, default: [] },
  // --token shows in process listings: prefer --token-file (its first line) or RNNSERVE_TOKEN
  token: { type: "string" },
  "token-file": { type: "string" },
  timeout: { type: "string", default: "30" },
};

function usage(details) {
  process.stderr.write(`${JSON.stringify({ event: "error", code: "USAGE", details })}\n`);
  process.exit(EXIT_USAGE);
}

function options() {
  let values;
  try {
    ({ values } = parseArgs({ options: OPTIONS }));
  } catch (err) {
    // an unknown flag or a missing value: one line and 64, not a stack trace and exit 1
    // (CANCELLED's number)
    usage(err.message);
  }
  // Number("abc") is NaN: a NaN deadline ended every call DEADLINE_EXCEEDED, and a max_tokens
  // of "abc" or 5.5 was sent as 0 (the server's default) or 5 without a word
  if (!Number.isInteger(Number(values["max-tokens"]))) {
    usage(`--max-tokens: ${JSON.stringify(values["max-tokens"])} is not an integer`);
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0 && Number.isFinite(timeout))) {
    usage(`--timeout: ${JSON.stringify(values.timeout)} is not a number of seconds > 0`);
  }
  values.token = bearerToken(values);
  return values;
}

// --token or --token-file (not both), else RNNSERVE_TOKEN; as rnn-client reads them
function bearerToken(values) {
  if (values.token !== undefined && values["token-file"] !== undefined) {
    usage("--token and --token-file: give one of them");
  }
  if (values["token-file"] === undefined) {
    return values.token ?? process.env.RNNSERVE_TOKEN ?? "";
  }
  const file = values["token-file"];
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    usage(`--token-file ${file}: cannot read it (${err.code || err.message})`);
  }
  const token = text.split(/\r?\n/)[0].trim();
  if (!token) usage(`--token-file ${file}: its first line is empty; write the token there`);
  return token;
}

function loadInference(address) {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names exactly as in the .proto: max_tokens, token_ids ...
    longs: String,
    enums: String, // finish_reason as "FINISH_REASON_LENGTH"
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).rnnserve.v1;
  return new v1.Inference(address, grpc.credentials.createInsecure());
}

function callOptions(opts) {
  const metadata = new grpc.Metadata();
  if (opts.token) metadata.set("authorization", `Bearer ${opts.token}`);
  const deadline = new Date(Date.now() + Number(opts.timeout) * 1000);
  return { metadata, deadline };
}

function fail(err) {
  const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || "UNKNOWN";
  process.stderr.write(`${JSON.stringify({ event: "error", code, details: err.details })}\n`);
  process.exit(typeof err.code === "number" && err.code > 0 ? err.code : 2);
}

function generate(stub, opts) {
  return new Promise((resolve, reject) => {
    const { metadata, deadline } = callOptions(opts);
    const request = {
      model: opts.model,
      prompt: opts.prompt,
      max_tokens: Number(opts["max-tokens"]),
    };
    const call = stub.Generate(request, metadata, { deadline });
    call.on("data", (msg) => {
      const line = {
        event: "token",
        text: msg.text,
        token_id: msg.token_id,
        logprob: msg.logprob,
        finish_reason: msg.finish_reason,
      };
      process.stdout.write(`${JSON.stringify(line)}\n`);
    });
    call.on("error", reject);
    call.on("end", resolve);
  });
}

function score(stub, opts) {
  return new Promise((resolve, reject) => {
    if (opts.score.length === 0) return resolve();
    const { metadata, deadline } = callOptions(opts);
    stub.Score({ model: opts.model, texts: opts.score }, metadata, { deadline }, (err, res) => {
      if (err) return reject(err);
      res.results.forEach((r, i) => {
        const line = {
          event: "score",
          text: opts.score[i],
          perplexity: r.perplexity,
          log_likelihood: r.log_likelihood,
          num_tokens: r.num_tokens,
          unknown_tokens: r.unknown_tokens,
        };
        process.stdout.write(`${JSON.stringify(line)}\n`);
      });
      resolve();
    });
  });
}

async function main() {
  const opts = options();
  const stub = loadInference(opts.address);
  try {
    await generate(stub, opts);
    await score(stub, opts);
  } catch (err) {
    fail(err);
  } finally {
    stub.close();
  }
}

main();
