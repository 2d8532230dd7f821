'use strict';
// Skiff Node.js runtime: a Lambda Runtime API (2018-06-01) client.
//
// Started by the agent as `/usr/bin/node /var/runtime/node/bootstrap.js`. Loads the handler named
// by `_HANDLER` (`path/to/module.export[.nested]`) from LAMBDA_TASK_ROOT — CommonJS (.js/.cjs) via
// require, ES modules (.mjs, or .js under `"type": "module"`) via dynamic import — then loops:
// next invocation -> handler(event, context[, callback]) -> response or error.
// No dependencies beyond Node's built-ins.

const http = require('http');
const path = require('path');
const fs = require('fs');
const util = require('util');

const API_PREFIX = '/2018-06-01/runtime';
const [API_HOST, API_PORT] = splitHostPort(process.env.AWS_LAMBDA_RUNTIME_API || '');
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function splitHostPort(address) {
  const i = address.lastIndexOf(':');
  if (i < 0) return [address, 80];
  return [address.slice(0, i).replace(/^\[|\]$/g, ''), Number(address.slice(i + 1))];
}

// ---------------------------------------------------------------------------------------------
// Runtime API client

function request(method, urlPath, body, headers, retried) {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.isBuffer(body) ? body : Buffer.from(body);
    const req = http.request({
      host: API_HOST, port: API_PORT, method, path: urlPath, agent,
      headers: Object.assign(payload ? { 'Content-Length': payload.length } : {}, headers || {}),
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', (e) => {
      // A kept-alive connection the agent closed while idle: retry once on a fresh one.
      if (req.reusedSocket && !retried && ['ECONNRESET', 'EPIPE', 'ECONNABORTED'].includes(e.code)) {
        request(method, urlPath, body, headers, true).then(resolve, reject);
      } else {
        reject(e);
      }
    });
    req.end(payload);
  });
}

const api = {
  async next() {
    // While a snapshot of the sandbox is taken the agent closes its sockets (gVisor cannot
    // save sockets it is watching) and reopens them after: wait for it, briefly backing off.
    let res;
    for (let delay = 1, waited = 0; ; waited += delay, delay = Math.min(delay * 2, 10)) {
      try {
        res = await request('GET', `${API_PREFIX}/invocation/next`);
        break;
      } catch (e) {
        if (waited > 60000 || !['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ECONNABORTED'].includes(e.code)) throw e;
        await new Promise((r) => setTimeout(r, delay));
      }
    }
    if (res.status !== 200) throw new Error(`next invocation: HTTP ${res.status}: ${res.body.toString().slice(0, 200)}`);
    return res;
  },
  async postResponse(id, body) {
    const res = await request('POST', `${API_PREFIX}/invocation/${encodeURIComponent(id)}/response`, body,
      { 'Content-Type': 'application/json' });
    if (res.status >= 300) throw new Error(`HTTP ${res.status}: ${res.body.toString().slice(0, 500)}`);
  },
  postError(id, error) {
    return request('POST', `${API_PREFIX}/invocation/${encodeURIComponent(id)}/error`, safeStringify(error), {
      'Content-Type': 'application/json', 'Lambda-Runtime-Function-Error-Type': 'Unhandled',
    });
  },
  postInitError(error) {
    return request('POST', `${API_PREFIX}/init/error`, safeStringify(error), {
      'Content-Type': 'application/json', 'Lambda-Runtime-Function-Error-Type': headerSafe(error.errorType),
    });
  },
};

function headerSafe(s) {
  return String(s).replace(/[^\x20-\x7e]/g, '?');
}

function safeStringify(v) {
  try { return JSON.stringify(v); } catch (e) { return JSON.stringify({ errorMessage: String(v && v.errorMessage), errorType: 'Runtime.MarshalError', stackTrace: [] }); }
}

// ---------------------------------------------------------------------------------------------
// Errors

function toError(err, typeOverride, messageOverride) {
  if (err instanceof Error || (err && typeof err === 'object' && typeof err.message === 'string' && typeof err.stack === 'string')) {
    return {
      errorType: typeOverride || err.name || (err.constructor && err.constructor.name) || 'Error',
      errorMessage: messageOverride !== undefined ? messageOverride : err.message,
      stackTrace: typeof err.stack === 'string' ? err.stack.split('\n').slice(1).map((l) => l.trim()).filter(Boolean) : [],
    };
  }
  // Like AWS: a thrown non-Error reports its typeof as the type.
  let message;
  try { message = typeof err === 'string' ? err : JSON.stringify(err); } catch (_) { message = String(err); }
  return { errorType: typeOverride || typeof err, errorMessage: messageOverride !== undefined ? messageOverride : String(message), stackTrace: [] };
}

function logError(prefix, error) {
  process.stderr.write(`${new Date().toISOString()}\t${currentRequestId || 'undefined'}\tERROR\t${prefix} \t${safeStringify(error)}\n`);
}

// ---------------------------------------------------------------------------------------------
// Console: AWS format `timestamp\trequest-id\tLEVEL\tmessage`

let currentRequestId;

function patchConsole() {
  const write = (stream, level) => (...args) => {
    stream.write(`${new Date().toISOString()}\t${currentRequestId || 'undefined'}\t${level}\t${util.format(...args)}\n`);
  };
  console.log = write(process.stdout, 'INFO');
  console.info = write(process.stdout, 'INFO');
  console.debug = write(process.stdout, 'DEBUG');
  console.warn = write(process.stderr, 'WARN');
  console.error = write(process.stderr, 'ERROR');
  const trace = write(process.stderr, 'TRACE');
  console.trace = (...args) => {
    const e = new Error(util.format(...args));
    e.name = 'Trace';
    trace(e.stack);
  };
}

// ---------------------------------------------------------------------------------------------
// Handler loading

class InitError extends Error {
  constructor(errorType, message, cause) {
    super(message);
    this.errorType = errorType;
    this.cause = cause;
  }
}

function isFile(p) {
  try { return fs.statSync(p).isFile(); } catch (_) { return false; }
}

function packageTypeIsModule(file) {
  let dir = path.dirname(file);
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (isFile(pj)) {
      try { return JSON.parse(fs.readFileSync(pj, 'utf8')).type === 'module'; } catch (_) { return false; }
    }
    const parent = path.dirname(dir);
    if (parent === dir || dir.endsWith(`${path.sep}node_modules`)) return false;
    dir = parent;
  }
}

async function importFile(file) {
  return import(require('url').pathToFileURL(file).href);
}

function loadError(e, moduleName) {
  if (e instanceof SyntaxError) {
    return new InitError('Runtime.UserCodeSyntaxError', `${e.name}: ${e.message}`, e);
  }
  if (e && (e.code === 'MODULE_NOT_FOUND' || e.code === 'ERR_MODULE_NOT_FOUND')) {
    return new InitError('Runtime.ImportModuleError', `Error: ${e.message}`, e);
  }
  return e;
}

async function loadModule(taskRoot, moduleRoot, moduleName) {
  const base = path.resolve(taskRoot, moduleRoot, moduleName);
  try {
    if (isFile(base)) return require(base); // extensionless file
    if (isFile(`${base}.js`)) {
      if (packageTypeIsModule(`${base}.js`)) return await importFile(`${base}.js`);
      try {
        return require(`${base}.js`);
      } catch (e) {
        if (e && e.code === 'ERR_REQUIRE_ESM') return await importFile(`${base}.js`);
        throw e;
      }
    }
    if (isFile(`${base}.mjs`)) return await importFile(`${base}.mjs`);
    if (isFile(`${base}.cjs`)) return require(`${base}.cjs`);
    // Fall back to Node's resolution (a directory with index.js, or a package in node_modules).
    const nodePath = (process.env.NODE_PATH || '').split(path.delimiter).filter(Boolean);
    let resolved;
    try {
      resolved = require.resolve(moduleName, { paths: [path.resolve(taskRoot, moduleRoot), ...nodePath] });
    } catch (e) {
      if (e && e.code === 'MODULE_NOT_FOUND') {
        throw new InitError('Runtime.ImportModuleError',
          `Error: Cannot find module '${path.join(moduleRoot, moduleName)}'\nRequire stack:\n- ${__filename}`, e);
      }
      throw e;
    }
    if (resolved.endsWith('.mjs') || (resolved.endsWith('.js') && packageTypeIsModule(resolved))) {
      return await importFile(resolved);
    }
    return require(resolved);
  } catch (e) {
    if (e instanceof InitError) throw e;
    throw loadError(e, moduleName);
  }
}

async function loadHandler(taskRoot, fullHandler) {
  const slash = fullHandler.lastIndexOf('/');
  const moduleRoot = slash >= 0 ? fullHandler.slice(0, slash) : '';
  const rest = slash >= 0 ? fullHandler.slice(slash + 1) : fullHandler;
  const dot = rest.indexOf('.');
  if (dot <= 0 || dot === rest.length - 1) {
    throw new InitError('Runtime.MalformedHandlerName', `Bad handler ${fullHandler}`);
  }
  const moduleName = rest.slice(0, dot);
  const handlerPath = rest.slice(dot + 1);
  const mod = await loadModule(taskRoot, moduleRoot, moduleName);
  const resolve = (obj) => handlerPath.split('.').reduce((o, k) => (o == null ? undefined : o[k]), obj);
  let fn = resolve(mod);
  // import() of a CommonJS file: exports the lexer could not see are only on `default`.
  if (fn === undefined && mod && mod.default && typeof mod.default === 'object') fn = resolve(mod.default);
  if (fn === undefined || fn === null) {
    throw new InitError('Runtime.HandlerNotFound', `${fullHandler} is undefined or not exported`);
  }
  if (typeof fn !== 'function') {
    throw new InitError('Runtime.HandlerNotFound', `${fullHandler} is not a function`);
  }
  return fn;
}

// ---------------------------------------------------------------------------------------------
// Invocation

function parseJsonHeader(v) {
  if (!v) return undefined;
  try { return JSON.parse(v); } catch (_) { return undefined; }
}

function makeContext(headers, finish) {
  const env = process.env;
  const deadline = Number(headers['lambda-runtime-deadline-ms']) || Date.now() + 900000;
  const identity = parseJsonHeader(headers['lambda-runtime-cognito-identity']);
  const ctx = {
    callbackWaitsForEmptyEventLoop: true,
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    awsRequestId: headers['lambda-runtime-aws-request-id'],
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    identity: identity ? {
      cognitoIdentityId: identity.cognitoIdentityId,
      cognitoIdentityPoolId: identity.cognitoIdentityPoolId,
    } : undefined,
    clientContext: parseJsonHeader(headers['lambda-runtime-client-context']),
    getRemainingTimeInMillis() { return Math.max(deadline - Date.now(), 0); },
    // Legacy completion methods.
    succeed(result) { finish(null, result, false); },
    fail(err) { finish(err == null ? 'handled' : err, undefined, false); },
    done(err, result) { finish(err, result, false); },
  };
  return ctx;
}

// The invocation in flight, so that an uncaught exception can be reported against it.
let inflight = null;

function runInvocation(handler, res) {
  const headers = res.headers;
  const requestId = headers['lambda-runtime-aws-request-id'];
  currentRequestId = requestId;
  if (headers['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = headers['lambda-runtime-trace-id'];
  else delete process.env._X_AMZN_TRACE_ID;

  return new Promise((resolve) => {
    let done = false;
    // `prebuilt`: err is already a {errorType, errorMessage, stackTrace} record.
    const finish = (err, result, prebuilt) => {
      if (done) return;
      done = true;
      inflight = null;
      let p;
      if (err !== null && err !== undefined) {
        const error = prebuilt ? err : toError(err);
        logError('Invoke Error', error);
        p = api.postError(requestId, error);
      } else {
        let body;
        try {
          body = JSON.stringify(result === undefined ? null : result);
        } catch (e) {
          const error = toError(e, 'Runtime.MarshalError', `Unable to stringify response body: ${e.message}`);
          logError('Invoke Error', error);
          p = api.postError(requestId, error);
        }
        if (!p) {
          p = api.postResponse(requestId, body).catch((e) => {
            const error = toError(e, 'Runtime.ResponseError', `Unable to post response: ${e.message}`);
            logError('Invoke Error', error);
            return api.postError(requestId, error);
          });
        }
      }
      p.then(resolve, (e) => { process.stderr.write(`bootstrap: runtime API: ${e.stack || e}\n`); process.exit(1); });
    };
    inflight = { requestId, abandon: () => { done = true; } };

    const bodyText = res.body.toString('utf8');
    let event;
    try {
      event = bodyText.trim() === '' ? {} : JSON.parse(bodyText);
    } catch (e) {
      finish(toError(e, 'Runtime.UnmarshalError', `Unable to parse event: ${e.message}`), undefined, true);
      return;
    }
    const context = makeContext(headers, finish);
    const callback = (err, result) => finish(err, result, false);
    let ret;
    try {
      ret = handler(event, context, callback);
    } catch (e) {
      finish(e);
      return;
    }
    if (ret && typeof ret.then === 'function') {
      ret.then((r) => finish(null, r), (e) => finish(e === undefined || e === null ? new Error(String(e)) : e));
    } else if (handler.length < 3) {
      // Synchronous handler not taking a callback: its return value is the result.
      finish(null, ret);
    }
    // Otherwise: a callback-style handler; wait for callback / context.succeed|fail|done.
  });
}

function onFatal(kind) {
  return (err) => {
    const error = toError(err);
    logError(kind, error);
    const exit = () => process.exit(1);
    if (inflight) {
      const { requestId, abandon } = inflight;
      inflight = null;
      abandon();
      api.postError(requestId, error).then(exit, exit);
    } else if (!initialized) {
      api.postInitError(error).then(exit, exit);
    } else {
      exit();
    }
  };
}

let initialized = false;

async function main() {
  if (!API_HOST) {
    process.stderr.write('bootstrap: AWS_LAMBDA_RUNTIME_API is not set\n');
    process.exit(1);
  }
  const taskRoot = process.env.LAMBDA_TASK_ROOT || '/var/task';
  try { process.chdir(taskRoot); } catch (_) { /* keep cwd */ }
  process.on('uncaughtException', onFatal('Uncaught Exception'));
  process.on('unhandledRejection', onFatal('Unhandled Promise Rejection'));
  patchConsole();

  let handler;
  try {
    handler = await loadHandler(taskRoot, process.env._HANDLER || '');
  } catch (e) {
    const error = e instanceof InitError
      ? { errorType: e.errorType, errorMessage: e.message, stackTrace: e.cause ? toError(e.cause).stackTrace : [] }
      : toError(e);
    logError('Init Error', error);
    try { await api.postInitError(error); } catch (e2) { process.stderr.write(`bootstrap: runtime API: ${e2}\n`); }
    process.exit(1);
  }
  initialized = true;

  for (;;) {
    const res = await api.next();
    await runInvocation(handler, res);
    currentRequestId = undefined;
  }
}

main().catch((e) => {
  process.stderr.write(`bootstrap: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
