#!/usr/bin/env node
'use strict';
/**
 * Streams a completion from the typed service ortserve.v1.TextGeneration to the terminal as it arrives, with
 * the flags of clients/generate.py: the prompt, then each response's new text on stdout; the finish summary
 * on stderr.
 *
 *   node generate.js --url 127.0.0.1:8001 --temperature 0.8 --seed 3 --max-tokens 40 "def "
 */

const { parseArgs } = require('node:util');
const client = require('./client');

const { values: args, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    ...client.CONNECTION_OPTIONS,
    url: { type: 'string', default: '127.0.0.1:8001' },
    model: { type: 'string', default: 'bytes_decoder' },
    'model-version': { type: 'string', default: '' },
    'max-tokens': { type: 'string', default: '64' },
    temperature: { type: 'string' },
    'top-k': { type: 'string', default: '0' },
    'top-p': { type: 'string' },
    'repetition-penalty': { type: 'string' },
    seed: { type: 'string' },
    stop: { type: 'string', multiple: true, default: [] },
    'ignore-eos': { type: 'boolean', default: false },
    'timeout-s': { type: 'string', default: '120' },
  },
});

/** "\n"-style escapes in --stop, as a shell passes them literally. */
function unescape(text) {
  return text.replace(/\\(n|t|r|\\)/g, (_, c) => ({ n: '\n', t: '\t', r: '\r', '\\': '\\' })[c]);
}

/** The GenerateRequest; optional settings are sent only when given, so the model's defaults apply otherwise. */
function buildRequest(prompt) {
  const request = {
    model: args.model, model_version: args['model-version'], prompt, max_tokens: Number(args['max-tokens']),
    top_k: Number(args['top-k']), stop: args.stop.map(unescape), ignore_eos: args['ignore-eos'],
  };
  for (const [flag, field] of [['temperature', 'temperature'], ['top-p', 'top_p'],
    ['repetition-penalty', 'repetition_penalty'], ['seed', 'seed']]) {
    if (args[flag] !== undefined) request[field] = field === 'seed' ? args[flag] : Number(args[flag]);
  }
  return request;
}

function main() {
  if (positionals.length !== 1) {
    process.stderr.write('usage: node generate.js [flags] PROMPT\n');
    process.exit(2);
  }
  const prompt = positionals[0];
  const { generation, close } = client.connect(args.url, args);
  process.stdout.write(prompt);
  const call = generation.Generate(buildRequest(prompt), client.deadline(Number(args['timeout-s'])));
  call.on('data', (response) => {
    process.stdout.write(response.text);
    if (response.finish_reason) {
      process.stderr.write(`\n[finish: ${response.finish_reason}; prompt ${response.prompt_tokens} tokens, `
        + `completion ${response.completion_tokens} tokens]\n`);
    }
  });
  call.on('error', (error) => client.exitWithError(error));
  call.on('end', () => {
    process.stdout.write('\n');
    close();
  });
}

main();
