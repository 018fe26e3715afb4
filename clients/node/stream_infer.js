#!/usr/bin/env node
'use strict';
/**
 * Streams a completion through Triton's text convention on ModelStreamInfer (what tritonclient and genai-perf
 * use): inputs text_input, max_tokens, stream, sampling_parameters (JSON) and exclude_input_in_output; each
 * response carries the new text in text_output. The request asks for an empty final response
 * (triton_enable_empty_final_response), so the end of the stream is the response flagged
 * triton_final_response.
 *
 * stdout: the prompt and each response's new text; stderr: "[final response after N responses]".
 *
 *   node stream_infer.js --url 127.0.0.1:8001 --temperature 0.8 --seed 3 --max-tokens 40 "def "
 */

const { parseArgs } = require('node:util');
const client = require('./client');

const { values: args, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    ...client.CONNECTION_OPTIONS,
    url: { type: 'string', default: '127.0.0.1:8001' },
    model: { type: 'string', default: 'bytes_decoder' },
    'max-tokens': { type: 'string', default: '64' },
    temperature: { type: 'string' },
    'top-k': { type: 'string' },
    'top-p': { type: 'string' },
    seed: { type: 'string' },
    'ignore-eos': { type: 'boolean', default: false },
    id: { type: 'string', default: 'node-1' },
    'timeout-s': { type: 'string', default: '120' },
  },
});

/** The sampling settings given on the command line, as the JSON of the sampling_parameters input. */
function samplingJson() {
  const settings = {};
  for (const [flag, key] of [['temperature', 'temperature'], ['top-k', 'top_k'], ['top-p', 'top_p'],
    ['seed', 'seed']]) {
    if (args[flag] !== undefined) settings[key] = Number(args[flag]);
  }
  if (args['ignore-eos']) settings.ignore_eos = true;
  return JSON.stringify(settings);
}

function buildRequest(prompt) {
  const tensors = [
    client.tensor('text_input', 'BYTES', [1], [prompt]),
    client.tensor('max_tokens', 'INT32', [1], [Number(args['max-tokens'])]),
    client.tensor('stream', 'BOOL', [1], [true]),
    client.tensor('sampling_parameters', 'BYTES', [1], [samplingJson()]),
    client.tensor('exclude_input_in_output', 'BOOL', [1], [true]),
  ];
  return client.inferRequest(args.model, tensors, {
    id: args.id, parameters: { triton_enable_empty_final_response: true },
  });
}

/** The new text of one response ('' for the empty final response). */
function newText(response) {
  const output = client.decodeOutputs(response).text_output;
  return output ? output.data.map((b) => b.toString('utf8')).join('') : '';
}

function main() {
  if (positionals.length !== 1) {
    process.stderr.write('usage: node stream_infer.js [flags] PROMPT\n');
    process.exit(2);
  }
  const prompt = positionals[0];
  const { inference, close } = client.connect(args.url, args);
  const call = inference.ModelStreamInfer(client.deadline(Number(args['timeout-s'])));
  let responses = 0;
  process.stdout.write(prompt);
  call.on('data', ({ error_message: errorMessage, infer_response: response }) => {
    if (errorMessage) {
      process.stderr.write(`\nerror: ${errorMessage}\n`);
      process.exit(1);
    }
    responses += 1;
    process.stdout.write(newText(response));
    const final = response.parameters.triton_final_response;
    if (final && final.bool_param) {
      process.stdout.write('\n');
      process.stderr.write(`[final response after ${responses} responses; id ${response.id}]\n`);
      call.end(); // one request per stream here: half-close, and the server ends the call
    }
  });
  call.on('error', (error) => client.exitWithError(error));
  call.on('end', () => close());
  call.write(buildRequest(prompt));
}

main();
