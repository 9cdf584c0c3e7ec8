/*
 * celery-orchestrator dashboard: a single-page app over the REST API (/v1).
 *
 * Views (hash routes, so the server serves one page):
 *   #/runs?flow=&status=&limit=   runs, newest first, refreshed every few seconds
 *   #/runs/ID                     one run: graph, steps and timeline, data, event log,
 *                                 approve / reject / cancel / retry; polled while active
 *   #/trigger?flow=               start a run with JSON inputs
 *
 * Every data call goes to ../v1/ with the bearer token from sessionStorage, if any; a 401
 * opens the token dialog and the call is made again with what was typed. Data from the
 * server is only ever written as text (textContent, attribute values): never as HTML.
 */
(() => {
  'use strict';

  const API = new URL('../v1/', document.baseURI);
  const TOKEN_KEY = 'orchestrator.apiToken';
  const BY_KEY = 'orchestrator.decidedBy';
  const STATUSES = ['pending', 'running', 'waiting', 'succeeded', 'failed', 'compensated', 'cancelled'];
  const STEP_STATUSES = ['pending', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'skipped', 'cancelled', 'compensated'];
  const ACTIVE = new Set(['pending', 'running', 'waiting']);
  const LIST_REFRESH_MS = 3000;
  const RUN_POLL_MS = 1000;
  // A run with thousands of step instances (a large forEach) is read less often, and only
  // its first MAX_STEP_ROWS steps (in start order) are drawn in the table.
  const BIG_RUN_STEPS = 1000;
  const BIG_RUN_POLL_MS = 5000;
  const MAX_STEP_ROWS = 500;

  // -- DOM helpers -------------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);

  /** Build an element: el('a', {href, class, text, dataset, onclick}, ...children). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = String(value);
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, '');
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const knownStatus = (s) => (STEP_STATUSES.includes(s) || STATUSES.includes(s) ? s : 'other');
  const badge = (status, props = {}) =>
    el('span', { ...props, class: `status status-${knownStatus(status)}`, text: status });
  const jsonText = (value) => JSON.stringify(value, null, 2);
  const pre = (value, props = {}) => el('pre', { ...props, class: 'json', text: jsonText(value) });
  const enc = encodeURIComponent;

  /** A recorded error ({type, message, step, traceback, ...}): the line, then the rest. */
  function errorView(error) {
    if (error === null || typeof error !== 'object' || Array.isArray(error)) return pre(error);
    const { type, message, step, traceback, ...rest } = error;
    return el('div', { class: 'error-view' },
      el('p', { class: 'error' }, type ? el('b', { text: type }) : null, type ? ': ' : '',
        message === undefined ? '' : String(message), step ? ` (step ${step})` : ''),
      Object.keys(rest).length ? pre(rest) : null,
      traceback ? el('details', {}, el('summary', { text: 'traceback' }),
        el('pre', { class: 'json', text: String(traceback) })) : null);
  }
  const runHref = (id) => `#/runs/${enc(id)}`;

  const pad = (n, width = 2) => String(n).padStart(width, '0');
  function fmtTime(ts) {
    if (ts === null || ts === undefined) return '';
    const d = new Date(ts * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtClock(ts) {
    if (ts === null || ts === undefined) return '';
    const d = new Date(ts * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '';
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(2)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} m ${Math.round(seconds % 60)} s`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} m`;
    return `${Math.floor(seconds / 86400)} d ${Math.round((seconds % 86400) / 3600)} h`;
  }
  const now = () => Date.now() / 1000;

  function showBanner(message) {
    const banner = $('#banner');
    banner.textContent = message;
    banner.hidden = false;
  }
  function clearBanner() {
    $('#banner').hidden = true;
  }

  // -- API calls and the token -------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const message = body && body.message ? body.message : `HTTP ${status}`;
      super(body && body.field ? `${body.field}: ${message}` : message);
      this.status = status;
      this.body = body || {};
    }
  }

  let tokenPrompt = null;

  /** Ask for a token once, however many calls were refused; resolves when one is typed. */
  function askToken(message) {
    if (tokenPrompt) return tokenPrompt;
    tokenPrompt = new Promise((resolve) => {
      const dialog = $('#token-dialog');
      const form = $('#token-form');
      const input = $('#token-input');
      const error = $('#token-error');
      error.textContent = message || '';
      error.hidden = !message;
      input.value = '';
      form.onsubmit = (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        dialog.close();
        tokenPrompt = null;
        resolve();
      };
      dialog.oncancel = (event) => event.preventDefault(); // Escape: nothing works without one
      dialog.showModal();
      input.focus();
    });
    return tokenPrompt;
  }

  function showAuthState(token) {
    $('#auth-state').textContent = token ? 'using an API token' : 'no token needed (dev mode)';
    $('#sign-out').hidden = !token;
  }

  /** Call the API: the parsed JSON body, or an ApiError naming the field when it names one. */
  async function api(path, { method = 'GET', body, headers = {} } = {}) {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const sent = { Accept: 'application/json', ...headers };
      if (token) sent.Authorization = `Bearer ${token}`;
      const init = { method, headers: sent, cache: 'no-store', credentials: 'omit' };
      if (body !== undefined) {
        sent['Content-Type'] = 'application/json';
        init.body = JSON.stringify(body);
      }
      let resp;
      try {
        resp = await fetch(new URL(path, API), init);
      } catch (exc) {
        throw new ApiError(0, { message: `cannot reach the API: ${exc.message}` });
      }
      let data = null;
      try {
        data = await resp.json();
      } catch (_) {
        data = null;
      }
      if (resp.status === 401) {
        if (sessionStorage.getItem(TOKEN_KEY) !== token) continue; // a new token came meanwhile
        sessionStorage.removeItem(TOKEN_KEY);
        await askToken(token ? `The token was refused: ${(data && data.message) || 'invalid token'}` : null);
        continue;
      }
      if (!resp.ok) throw new ApiError(resp.status, data);
      showAuthState(token);
      return data;
    }
  }

  // -- views and polling -------------------------------------------------------------------

  // The view on screen; a route change marks it dead so its late answers and timers do nothing.
  let current = { alive: false, timers: [] };

  function newView() {
    current.alive = false;
    current.timers.forEach(clearTimeout);
    current = { alive: true, timers: [] };
    return current;
  }

  function later(view, fn, ms) {
    if (view.alive) view.timers.push(setTimeout(() => view.alive && fn(), ms));
  }

  function route() {
    const hash = location.hash.replace(/^#/, '') || '/runs';
    const [path, query] = hash.split('?');
    const params = new URLSearchParams(query || '');
    const view = newView();
    const root = $('#view');
    root.replaceChildren();
    clearBanner();
    const match = path.match(/^\/runs\/([^/]+)$/);
    const section = match ? 'runs' : path === '/trigger' ? 'trigger' : 'runs';
    document.querySelectorAll('nav a[data-nav]').forEach((a) => {
      a.classList.toggle('active', a.dataset.nav === section);
    });
    let runId = null;
    try {
      runId = match ? decodeURIComponent(match[1]) : null;
    } catch (_) {
      runId = match[1]; // not valid percent-encoding: ask for it as it is (a 404)
    }
    if (match) runView(view, root, runId);
    else if (path === '/trigger') triggerView(view, root, params);
    else runsView(view, root, params);
  }

  function labelled(text, control) {
    return el('label', {}, text, control);
  }

  function options(select, values, selected) {
    select.replaceChildren(...values.map(([value, text]) => el('option', { value, text })));
    select.value = selected;
  }

  // -- runs list ---------------------------------------------------------------------------

  function stepSummary(steps) {
    const counts = {};
    for (const s of Object.values(steps || {})) counts[s.status] = (counts[s.status] || 0) + 1;
    return STEP_STATUSES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`).join(', ');
  }

  function runRow(run) {
    const start = run.started_at || run.created_at;
    const end = run.finished_at || (ACTIVE.has(run.status) ? now() : null);
    return el('tr', { dataset: { run: run.id, status: run.status } },
      el('td', {}, el('a', { class: 'mono', href: runHref(run.id), text: run.id })),
      el('td', {}, el('a', { href: `#/runs?flow=${enc(run.flow)}`, text: run.flow })),
      el('td', {}, badge(run.status, { class: 'run-status' })),
      el('td', { text: fmtTime(run.created_at) }),
      el('td', { class: 'num', text: start && end ? fmtDuration(end - start) : '' }),
      el('td', { class: 'muted', text: stepSummary(run.steps) }));
  }

  function runsView(view, root, params) {
    const flow = params.get('flow') || '';
    const status = params.get('status') || '';
    const limit = params.get('limit') || '50';
    const flowSelect = el('select', { name: 'flow', id: 'filter-flow' });
    options(flowSelect, [['', 'all flows'], ...(flow ? [[flow, flow]] : [])], flow);
    const statusSelect = el('select', { name: 'status', id: 'filter-status' });
    options(statusSelect, [['', 'any status'], ...STATUSES.map((s) => [s, s])], status);
    const limitSelect = el('select', { name: 'limit' });
    const limits = ['20', '50', '100', '200', '500', '1000'];
    options(limitSelect, (limits.includes(limit) ? limits : [limit, ...limits]).map((n) => [n, `${n} newest`]), limit);
    const auto = el('input', { type: 'checkbox', name: 'refresh', checked: params.get('refresh') !== 'off' });
    const updated = el('span', { class: 'muted' });
    const form = el('form', { class: 'filters', id: 'runs-filters' },
      labelled('Flow', flowSelect), labelled('Status', statusSelect), labelled('Show', limitSelect),
      el('label', {}, auto, 'auto-refresh'), updated,
      el('a', { href: `#/trigger${flow ? `?flow=${enc(flow)}` : ''}`, text: 'Trigger a run…' }));
    form.addEventListener('submit', (event) => event.preventDefault());
    form.addEventListener('change', () => {
      const q = new URLSearchParams();
      if (flowSelect.value) q.set('flow', flowSelect.value);
      if (statusSelect.value) q.set('status', statusSelect.value);
      if (limitSelect.value !== '50') q.set('limit', limitSelect.value);
      if (!auto.checked) q.set('refresh', 'off');
      location.hash = `#/runs${q.toString() ? `?${q}` : ''}`;
    });
    const tbody = el('tbody');
    const table = el('table', { id: 'runs' },
      el('thead', {}, el('tr', {}, ['Run', 'Flow', 'Status', 'Created', 'Duration', 'Steps'].map((h) => el('th', { text: h })))),
      tbody);
    const empty = el('p', { class: 'muted', text: 'No runs match.', hidden: true });
    root.append(el('h1', { text: 'Runs' }), form, table, empty);

    api('flows').then((data) => {
      if (!view.alive) return;
      const names = data.flows.map((f) => f.name).sort();
      if (flow && !names.includes(flow)) names.unshift(flow);
      options(flowSelect, [['', 'all flows'], ...names.map((n) => [n, n])], flow);
    }).catch((exc) => view.alive && showBanner(`flows: ${exc.message}`));

    async function refresh() {
      const q = new URLSearchParams({ limit });
      if (flow) q.set('flow', flow);
      if (status) q.set('status', status);
      try {
        const data = await api(`runs?${q}`);
        if (!view.alive) return;
        tbody.replaceChildren(...data.runs.map(runRow));
        empty.hidden = data.runs.length > 0;
        updated.textContent = `updated ${fmtClock(now()).slice(0, 8)}`;
        clearBanner();
      } catch (exc) {
        if (view.alive) showBanner(`runs: ${exc.message}`);
      }
      if (auto.checked) later(view, refresh, LIST_REFRESH_MS);
    }
    refresh();
  }

  // -- trigger -----------------------------------------------------------------------------

  function triggerView(view, root, params) {
    const flowSelect = el('select', { name: 'flow', required: true });
    const wanted = params.get('flow') || '';
    options(flowSelect, [['', 'loading…']], '');
    const inputs = el('textarea', { name: 'inputs', spellcheck: 'false', placeholder: '{"message": "hello"}' });
    inputs.value = params.get('inputs') || '{}';
    const key = el('input', { name: 'idempotencyKey', size: 40, placeholder: 'optional' });
    const error = el('p', { class: 'error', id: 'trigger-error', hidden: true });
    const submit = el('button', { type: 'submit', class: 'primary', text: 'Trigger' });
    const form = el('form', { id: 'trigger-form', class: 'panel' },
      el('p', {}, labelled('Flow', flowSelect)),
      el('p', {}, el('label', { for: 'trigger-inputs' }, 'Inputs (a JSON object)')),
      inputs,
      el('p', {}, labelled('Idempotency-Key', key)),
      error,
      el('div', { class: 'buttons' }, submit));
    inputs.id = 'trigger-inputs';
    root.append(el('h1', { text: 'Trigger a run' }), form);

    api('flows').then((data) => {
      if (!view.alive) return;
      const flows = [...data.flows].sort((a, b) => a.name.localeCompare(b.name));
      const choices = flows.map((f) => [f.name, f.state === 'stopped' ? `${f.name} (stopped)` : f.name]);
      options(flowSelect, [['', 'choose a flow'], ...choices], flows.some((f) => f.name === wanted) ? wanted : '');
    }).catch((exc) => view.alive && showBanner(`flows: ${exc.message}`));

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      error.hidden = true;
      let values;
      try {
        values = JSON.parse(inputs.value || '{}');
      } catch (exc) {
        error.textContent = `inputs: not valid JSON: ${exc.message}`;
        error.hidden = false;
        return;
      }
      if (values === null || typeof values !== 'object' || Array.isArray(values)) {
        error.textContent = 'inputs: must be a JSON object, e.g. {"message": "hello"}';
        error.hidden = false;
        return;
      }
      const headers = key.value.trim() ? { 'Idempotency-Key': key.value.trim() } : {};
      submit.disabled = true;
      try {
        const run = await api(`flows/${enc(flowSelect.value)}/runs`, { method: 'POST', body: { inputs: values }, headers });
        if (view.alive) location.hash = runHref(run.id);
      } catch (exc) {
        error.textContent = exc.message;
        error.hidden = false;
      } finally {
        submit.disabled = false;
      }
    });
  }

  // -- one run -----------------------------------------------------------------------------

  function runView(view, root, runId) {
    const state = {
      run: null,
      lastEvent: '-',
      approvals: {}, // step key -> {approvers, message, deadline, escalated}
      waits: {}, // step key -> the wait of its latest step.waiting event
      stepsSig: null,
      graphSig: null,
      graphText: null,
      graphSeq: 0,
      pollSeq: 0,
      expanded: new Set(),
      cards: new Map(),
    };
    const status = el('span', { id: 'run-status' });
    const meta = el('div', { class: 'meta', id: 'run-meta' });
    const actionMsg = el('span', { class: 'muted', id: 'action-message' });
    const cancelBtn = el('button', { type: 'button', class: 'danger', id: 'cancel-run', text: 'Cancel run', disabled: true });
    const retryBtn = el('button', { type: 'button', id: 'retry-run', text: 'Retry from the failed step', disabled: true });
    const again = el('a', { id: 'run-again', text: 'Trigger again with these inputs…', hidden: true });
    const errorBox = el('div', { id: 'run-error', hidden: true });
    const approvals = el('section', { id: 'approvals' });
    const graph = el('div', { id: 'graph', class: 'panel' }, el('p', { class: 'muted', text: 'Drawing…' }));
    const stepsBody = el('tbody');
    const inputsPre = el('pre', { class: 'json', id: 'run-inputs' });
    const outputsPre = el('pre', { class: 'json', id: 'run-outputs' });
    const eventsBody = el('tbody');

    root.append(
      el('p', {}, el('a', { href: '#/runs', text: '← all runs' })),
      el('h1', {}, 'Run ', el('span', { class: 'mono', text: runId }), ' ', status),
      meta,
      el('div', { class: 'toolbar' }, cancelBtn, retryBtn, again, actionMsg),
      errorBox,
      approvals,
      el('h2', { text: 'Graph' }), graph,
      el('h2', { text: 'Steps' }),
      el('table', { id: 'steps' },
        el('thead', {}, el('tr', {}, ['Step', 'Status', 'Attempts', 'Started', 'Ended', 'Duration', 'Worker', 'Timeline', '']
          .map((h) => el('th', { text: h })))),
        stepsBody),
      el('div', { class: 'grid2' },
        el('div', {}, el('h2', { text: 'Inputs' }), inputsPre),
        el('div', {}, el('h2', { text: 'Outputs' }), outputsPre)),
      el('h2', { text: 'Event log' }),
      el('table', { id: 'events' },
        el('thead', {}, el('tr', {}, ['Time', 'After', 'Event', 'Step', 'Details'].map((h) => el('th', { text: h })))),
        eventsBody));

    async function act(button, path, done) {
      button.disabled = true;
      actionMsg.textContent = '';
      try {
        await api(`runs/${enc(runId)}/${path}`, { method: 'POST' });
        actionMsg.textContent = done;
      } catch (exc) {
        actionMsg.textContent = '';
        showBanner(exc.message);
      }
      poll();
    }
    cancelBtn.addEventListener('click', () => {
      if (window.confirm(`Cancel run ${runId}? Running steps are revoked.`)) act(cancelBtn, 'cancel', 'cancelled');
    });
    retryBtn.addEventListener('click', () => act(retryBtn, 'retry', 'retried from the failed step'));

    /** Read the run and its new events; keep polling while it is active. */
    async function poll() {
      const seq = ++state.pollSeq;
      view.timers.forEach(clearTimeout);
      view.timers = [];
      let run;
      let events;
      try {
        run = await api(`runs/${enc(runId)}`);
        events = (await api(`runs/${enc(runId)}/events?after=${enc(state.lastEvent)}`)).events;
      } catch (exc) {
        if (!view.alive || seq !== state.pollSeq) return;
        if (exc.status === 404) {
          root.replaceChildren(el('h1', { text: 'Run not found' }),
            el('p', { text: `${exc.message}. Finished runs are removed after the retention period (ORCHESTRATOR_RETENTION_S).` }),
            el('p', {}, el('a', { href: '#/runs', text: '← all runs' })));
          return;
        }
        showBanner(exc.message);
        later(view, poll, RUN_POLL_MS * 3);
        return;
      }
      if (!view.alive || seq !== state.pollSeq) return;
      clearBanner();
      state.run = run;
      addEvents(events);
      renderRun(run);
      const graphSig = JSON.stringify(Object.entries(run.steps).map(([k, s]) => [k, s.status]).sort());
      if (graphSig !== state.graphSig) {
        state.graphSig = graphSig;
        renderGraph(run);
      }
      const big = Object.keys(run.steps).length > BIG_RUN_STEPS;
      if (ACTIVE.has(run.status)) later(view, poll, big ? BIG_RUN_POLL_MS : RUN_POLL_MS);
    }

    function addEvents(events) {
      for (const e of events) {
        state.lastEvent = e.id;
        if (e.type === 'step.waiting' && e.wait) {
          state.waits[e.step] = e.wait;
          if (Array.isArray(e.wait.approvers)) {
            state.approvals[e.step] = { approvers: e.wait.approvers, message: e.wait.message, deadline: e.wait.deadline };
          }
        } else if (e.type === 'step.escalated' && state.approvals[e.step]) {
          Object.assign(state.approvals[e.step], { approvers: e.approvers || [], escalated: true });
          if (state.cards.has(e.step)) state.cards.get(e.step).remove();
          state.cards.delete(e.step);
        }
        const { id, ts, type, step, ...rest } = e;
        const created = state.run && state.run.created_at;
        eventsBody.append(el('tr', { dataset: { type } },
          el('td', { class: 'mono', text: fmtClock(ts) }),
          el('td', { class: 'num', text: created && ts ? `+${fmtDuration(Math.max(0, ts - created))}` : '' }),
          el('td', { text: type }),
          el('td', { class: 'mono', text: step || '' }),
          el('td', {}, eventDetails(rest))));
      }
    }

    function eventDetails(rest) {
      if (!Object.keys(rest).length) return '';
      const text = JSON.stringify(rest);
      if (text.length <= 240) return el('code', { text });
      return el('details', {}, el('summary', {}, el('code', { text: `${text.slice(0, 200)}…` })), pre(rest));
    }

    function renderRun(run) {
      status.replaceChildren(badge(run.status));
      status.dataset.status = run.status;
      document.title = `${run.flow} · ${run.status} · celery-orchestrator`;
      const start = run.started_at || run.created_at;
      const end = run.finished_at || (ACTIVE.has(run.status) ? now() : null);
      const item = (label, value, props = {}) => el('span', {}, `${label} `, el('b', { ...props, text: value }));
      meta.replaceChildren(...[
        el('span', {}, 'flow ', el('a', { href: `#/runs?flow=${enc(run.flow)}`, text: run.flow })),
        item('version', run.version, { class: 'mono' }),
        item('created', fmtTime(run.created_at)),
        run.started_at ? item('started', fmtTime(run.started_at)) : null,
        run.finished_at ? item('finished', fmtTime(run.finished_at)) : null,
        start && end ? item(run.finished_at ? 'took' : 'running for', fmtDuration(end - start)) : null,
        run.idempotency_key ? item('idempotency key', run.idempotency_key) : null,
      ].filter(Boolean));
      cancelBtn.disabled = !ACTIVE.has(run.status);
      retryBtn.disabled = run.status !== 'failed';
      again.hidden = false;
      again.href = `#/trigger?flow=${enc(run.flow)}&inputs=${enc(JSON.stringify(run.inputs || {}))}`;
      errorBox.hidden = !run.error;
      if (run.error) errorBox.replaceChildren(el('h2', { class: 'error', text: 'Error' }), errorView(run.error));
      inputsPre.textContent = jsonText(run.inputs || {});
      outputsPre.textContent = run.outputs === null || run.outputs === undefined
        ? (ACTIVE.has(run.status) ? '(not yet)' : '(none)') : jsonText(run.outputs);
      renderApprovals(run);
      const stepsSig = JSON.stringify(run.steps);
      if (stepsSig !== state.stepsSig) {
        state.stepsSig = stepsSig;
        renderSteps(run);
      }
    }

    function renderApprovals(run) {
      const waiting = Object.keys(state.approvals).filter((k) => run.steps[k] && run.steps[k].status === 'waiting');
      for (const [key, card] of state.cards) {
        if (!waiting.includes(key)) {
          card.remove();
          state.cards.delete(key);
        }
      }
      for (const key of waiting) {
        if (!state.cards.has(key)) {
          const card = approvalCard(key, state.approvals[key]);
          state.cards.set(key, card);
          approvals.append(card);
        }
      }
    }

    function approvalCard(key, info) {
      const by = el('input', { name: 'by', required: true, size: 16, autocomplete: 'username' });
      by.value = localStorage.getItem(BY_KEY) || '';
      const comment = el('input', { name: 'comment', size: 40 });
      const message = el('span', { class: 'muted decision-message' });
      const approvers = info.approvers && info.approvers.length ? info.approvers.join(', ') : 'anyone';
      const form = el('form', { class: 'approval', dataset: { step: key } },
        el('div', {}, el('b', { class: 'mono', text: key }), ' waits for a decision',
          el('span', { class: 'muted' }, ` · approvers: ${approvers}`,
            info.escalated ? ' (escalated)' : '',
            info.deadline ? ` · until ${fmtTime(info.deadline)}` : '')),
        info.message ? el('div', { class: 'message', text: info.message }) : null,
        labelled('By', by), labelled('Comment', comment),
        el('button', { type: 'submit', name: 'decision', value: 'approve', class: 'primary', text: 'Approve' }), ' ',
        el('button', { type: 'submit', name: 'decision', value: 'reject', class: 'danger', text: 'Reject' }), ' ',
        message);
      form.addEventListener('submit', async (event) => {
        event.preventDefault();
        const verb = event.submitter && event.submitter.value === 'reject' ? 'reject' : 'approve';
        const buttons = form.querySelectorAll('button');
        buttons.forEach((b) => { b.disabled = true; });
        message.className = 'muted decision-message';
        message.textContent = `${verb === 'approve' ? 'approving' : 'rejecting'}…`;
        try {
          const body = { by: by.value.trim(), comment: comment.value.trim() || null };
          const result = await api(`runs/${enc(runId)}/steps/${enc(key)}/${verb}`, { method: 'POST', body });
          localStorage.setItem(BY_KEY, body.by);
          message.className = 'ok decision-message';
          message.textContent = `${result.decision} by ${result.by}`;
          poll();
        } catch (exc) {
          message.className = 'error decision-message';
          message.textContent = exc.message;
          buttons.forEach((b) => { b.disabled = false; });
        }
      });
      return form;
    }

    function describeWait(wait) {
      if (!wait) return null;
      if (Array.isArray(wait.approvers)) return `waits for a decision by ${wait.approvers.join(', ') || 'anyone'}`;
      if (wait.signal) return `waits for the signal ${wait.signal}`;
      if (wait.run) return `waits for run ${wait.run} to be ${wait.status}`;
      if (wait.deadline) return `sleeps until ${fmtTime(wait.deadline)}`;
      return null;
    }

    function renderSteps(run) {
      const entries = Object.entries(run.steps).sort(([ka, a], [kb, b]) =>
        (a.started_at ?? Infinity) - (b.started_at ?? Infinity) || ka.localeCompare(kb));
      const t0 = run.started_at || run.created_at || now();
      let t1 = run.finished_at || now();
      for (const [, s] of entries) t1 = Math.max(t1, s.finished_at || 0);
      const span = Math.max(t1 - t0, 0.001);
      const rows = [];
      for (const [key, s] of entries.slice(0, MAX_STEP_ROWS)) {
        const end = s.finished_at || (s.started_at ? (ACTIVE.has(run.status) ? now() : t1) : null);
        const track = el('div', { class: 'bar-track' });
        if (s.started_at) {
          const bar = el('div', { class: `bar status-${knownStatus(s.status)}`,
            title: `${key}: ${fmtClock(s.started_at)} → ${s.finished_at ? fmtClock(s.finished_at) : '…'}` });
          bar.style.left = `${Math.min(100, Math.max(0, ((s.started_at - t0) / span) * 100))}%`;
          bar.style.width = `${Math.max(0, Math.min(100, ((end - s.started_at) / span) * 100))}%`;
          track.append(bar);
        }
        const detail = el('tr', { class: 'detail', dataset: { step: key }, hidden: !state.expanded.has(key) },
          el('td', { colspan: 9 }, stepDetail(key, s)));
        const toggle = el('button', { type: 'button', class: 'link', text: state.expanded.has(key) ? 'hide' : 'details' });
        toggle.addEventListener('click', () => {
          const open = detail.hidden;
          detail.hidden = !open;
          toggle.textContent = open ? 'hide' : 'details';
          if (open) state.expanded.add(key); else state.expanded.delete(key);
        });
        rows.push(el('tr', { dataset: { step: key, status: s.status } },
          el('td', { class: 'mono', text: key }),
          el('td', {}, badge(s.status, { class: 'step-status' })),
          el('td', { class: 'num', text: s.attempts ?? '' }),
          el('td', { class: 'mono', text: fmtClock(s.started_at) }),
          el('td', { class: 'mono', text: fmtClock(s.finished_at) }),
          el('td', { class: 'num', text: s.finished_at && s.started_at ? fmtDuration(s.finished_at - s.started_at) : '' }),
          el('td', { class: 'mono muted', text: s.worker || '' }),
          el('td', {}, track),
          el('td', {}, toggle)), detail);
      }
      if (entries.length > MAX_STEP_ROWS) {
        rows.push(el('tr', {}, el('td', { colspan: 9, class: 'muted',
          text: `… and ${entries.length - MAX_STEP_ROWS} more step instances (GET /v1/runs/${run.id} has them all)` })));
      }
      stepsBody.replaceChildren(...rows);
    }

    function stepDetail(key, s) {
      const parts = [];
      const wait = s.status === 'waiting' ? describeWait(state.waits[key]) : null;
      if (wait) parts.push(el('p', { text: wait }));
      if (s.input !== null && s.input !== undefined) parts.push(el('div', {}, el('b', { text: 'Input' }), pre(s.input)));
      if (s.output !== null && s.output !== undefined) parts.push(el('div', {}, el('b', { text: 'Output' }), pre(s.output)));
      if (s.error) parts.push(el('div', {}, el('b', { class: 'error', text: 'Error' }), errorView(s.error)));
      if (!parts.length) parts.push(el('p', { class: 'muted', text: 'No input, output or error recorded.' }));
      return el('div', { class: 'grid2' }, parts);
    }

    async function renderGraph(run) {
      const seq = ++state.graphSeq;
      let text;
      try {
        text = (await api(`flows/${enc(run.flow)}/graph?run=${enc(run.id)}`)).graph;
      } catch (exc) {
        if (view.alive && seq === state.graphSeq) graph.replaceChildren(el('p', { class: 'error', text: `graph: ${exc.message}` }));
        return;
      }
      if (!view.alive || seq !== state.graphSeq || text === state.graphText) return;
      state.graphText = text;
      if (!window.mermaid) {
        graph.replaceChildren(el('p', { class: 'error', text: 'Mermaid did not load; the graph as text:' }), el('pre', { class: 'json', text }));
        return;
      }
      try {
        const { svg } = await window.mermaid.render(`run-graph-${seq}`, text);
        if (!view.alive || seq !== state.graphSeq) return;
        // Mermaid's own output, sanitised by it (securityLevel strict), parsed rather than
        // assigned as HTML; the page's CSP forbids inline scripts and handlers anyway.
        const drawing = new DOMParser().parseFromString(svg, 'text/html').querySelector('svg');
        if (!drawing) throw new Error('Mermaid returned no SVG');
        graph.replaceChildren(document.adoptNode(drawing));
        graph.dataset.rendered = String(seq);
      } catch (exc) {
        if (!view.alive || seq !== state.graphSeq) return;
        graph.replaceChildren(el('p', { class: 'error', text: `graph: ${exc.message || exc}` }), el('pre', { class: 'json', text }));
      }
    }

    poll();
  }

  // -- start -------------------------------------------------------------------------------

  if (window.mermaid) {
    window.mermaid.initialize({
      startOnLoad: false,
      securityLevel: 'strict',
      theme: 'neutral',
      maxTextSize: 1000000,
      maxEdges: 20000,
      flowchart: { useMaxWidth: true },
    });
  }
  $('#sign-out').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  window.addEventListener('hashchange', route);
  route();
})();
