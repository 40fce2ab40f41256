// The orchestra dashboard: a hand-written page over the dashboard's JSON API (api/...) and its
// event stream (api/stream). Everything shown from the server goes in through textContent,
// never as HTML.
'use strict';

(function () {
  // Errors of this script are shown on the page (and read by the browser test).
  function reportError(message) {
    const box = document.getElementById('js-errors');
    if (!box) return;
    box.hidden = false;
    const line = document.createElement('div');
    line.className = 'js-error';
    line.textContent = message;
    box.appendChild(line);
  }
  window.addEventListener('error', (e) => reportError('script error: ' + (e.message || e.type)));
  window.addEventListener('unhandledrejection', (e) => reportError('script error: ' + (e.reason && e.reason.message ? e.reason.message : String(e.reason))));

  const STATUSES = ['WAITING', 'PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED'];
  const state = {
    token: sessionStorage.getItem('orchestra-token') || '',
    actions: {},
    tokenRequired: false,
    page: null,
    refreshTimer: null,
    painting: false,
  };

  // h('tag.class', {attr: value, onclick: fn}, child...) with text children as text nodes.
  function h(spec, attrs, ...children) {
    const [tag, ...classes] = spec.split('.');
    const el = document.createElement(tag);
    if (classes.length) el.className = classes.join(' ');
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // Where the dashboard is mounted ('/' alone, '/ops/' nested in a service).
  const BASE = (document.querySelector('meta[name="orchestra-base"]') || {}).content || '';

  async function api(path, method) {
    const headers = { accept: 'application/json' };
    if (state.token) headers['x-orchestra-token'] = state.token;
    const r = await fetch(BASE + path, { method: method || 'GET', headers, credentials: 'same-origin' });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (!r.ok) {
      const err = new Error((body && body.error) || (r.status + ' ' + r.statusText));
      err.status = r.status;
      throw err;
    }
    return body;
  }

  function notice(text, bad) {
    const n = document.getElementById('notice');
    n.hidden = !text;
    n.className = 'notice' + (bad ? ' bad' : '');
    n.textContent = text || '';
  }

  function fmtTime(t) {
    if (!t) return '';
    const d = new Date(t);
    return isNaN(d) ? String(t) : d.toLocaleString();
  }
  function ago(t) {
    const s = Math.max(0, Math.round((Date.now() - new Date(t).getTime()) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    return Math.round(s / 3600) + ' h ago';
  }
  function statusEl(s) { return h('span.status.s-' + s, {}, s); }
  function taskLink(id) { return h('a.mono', { href: '#/task/' + encodeURIComponent(id) }, id); }
  function json(v) { return v === undefined || v === null ? '' : JSON.stringify(v, null, 2); }

  // ---- actions -------------------------------------------------------------------------------

  async function act(what, id, button) {
    if (button) button.disabled = true;
    try {
      const t = await api('api/tasks/' + encodeURIComponent(id) + '/' + what, 'POST');
      notice(what + ': task ' + id + ' is now ' + t.status);
      refreshSoon(0);
    } catch (e) {
      notice(what + ' ' + id + ': ' + e.message, true);
      if (e.status === 401) document.getElementById('token-box').hidden = false;
      if (button) button.disabled = false;
    }
  }

  // A queue or dead-letter action: POST `path`, then say what happened and refresh.
  async function control(path, say, button) {
    if (button) button.disabled = true;
    try {
      const r = await api(path, 'POST');
      notice(say(r));
      refreshSoon(0);
    } catch (e) {
      notice(path + ': ' + e.message, true);
      if (e.status === 401) document.getElementById('token-box').hidden = false;
      if (button) button.disabled = false;
    }
  }

  function outcomesText(r) {
    const by = {};
    for (const o of r.outcomes) by[o.outcome] = (by[o.outcome] || 0) + 1;
    const parts = Object.entries(by).map(([k, n]) => n + ' ' + k.replace('_', ' '));
    const skipped = r.outcomes.filter((o) => o.outcome === 'skipped').map((o) => o.message_id + ': ' + o.reason);
    return r.queue + ': ' + (parts.length ? parts.join(', ') : 'no dead letter') + (skipped.length ? ' (' + skipped.join('; ') + ')' : '');
  }

  function taskButtons(t) {
    const out = [];
    if (state.actions.cancel && (t.status === 'PENDING' || t.status === 'WAITING' || t.status === 'RUNNING')) {
      out.push(h('button.danger', { dataset: { action: 'cancel', task: t.task_id }, onclick: (e) => act('cancel', t.task_id, e.target) }, 'Cancel'));
    }
    if (state.actions.retry && (t.status === 'FAILED' || t.status === 'CANCELLED')) {
      out.push(h('button', { dataset: { action: 'retry', task: t.task_id }, onclick: (e) => act('retry', t.task_id, e.target) }, 'Retry'));
    }
    return out;
  }

  // ---- pages ---------------------------------------------------------------------------------

  function chart(history) {
    const NS = 'http://www.w3.org/2000/svg';
    const s = (tag, attrs) => {
      const el = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
      return el;
    };
    const W = 900, H = 190, L = 44, R = 50, T = 10, B = 22;
    const buckets = history.buckets;
    const secs = history.bucket_secs;
    const rate = buckets.map((b) => (b.completed + b.failed) / secs);
    const avg = buckets.map((b) => (b.run_n ? b.run_ms_sum / b.run_n : null));
    const max = buckets.map((b) => (b.run_n ? b.run_ms_max : null));
    const topRate = Math.max(1, ...rate);
    const topMs = Math.max(1, ...max.filter((v) => v !== null));
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'throughput and latency' });
    const w = (W - L - R) / buckets.length;
    const y = (v, top) => T + (H - T - B) * (1 - v / top);
    svg.appendChild(s('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
    buckets.forEach((b, i) => {
      const okH = (H - T - B) * (b.completed / secs) / topRate;
      const badH = (H - T - B) * (b.failed / secs) / topRate;
      if (okH > 0) svg.appendChild(s('rect', { class: 'bar-ok', x: L + i * w + 0.5, width: Math.max(1, w - 1), y: H - B - okH, height: okH }));
      if (badH > 0) svg.appendChild(s('rect', { class: 'bar-bad', x: L + i * w + 0.5, width: Math.max(1, w - 1), y: H - B - okH - badH, height: badH }));
    });
    const line = (values, cls) => {
      const pts = [];
      values.forEach((v, i) => { if (v !== null) pts.push(`${(L + i * w + w / 2).toFixed(1)},${y(v, topMs).toFixed(1)}`); });
      if (pts.length) svg.appendChild(s('polyline', { class: cls, points: pts.join(' ') }));
    };
    line(max, 'line-max');
    line(avg, 'line');
    const label = (x, yy, text, anchor) => {
      const t = s('text', { x, y: yy, 'text-anchor': anchor || 'start' });
      t.textContent = text;
      svg.appendChild(t);
    };
    label(L - 4, T + 8, topRate.toFixed(topRate < 10 ? 1 : 0) + '/s', 'end');
    label(L - 4, H - B, '0', 'end');
    label(W - R + 4, T + 8, Math.round(topMs) + ' ms');
    label(L, H - 6, Math.round(buckets.length * secs / 60) + ' min ago');
    label(W - R, H - 6, 'now', 'end');
    return h('div.chart', {}, svg, h('div.legend', {},
      h('span', {}, h('span.sw.ok'), 'completed /s'), h('span', {}, h('span.sw.bad'), 'failed /s'),
      h('span', {}, h('span.sw.run'), 'mean run time'), h('span', {}, h('span.sw.max'), 'max run time')));
  }

  const pages = {
    async overview() {
      const o = await api('api/overview');
      const view = [h('h1', {}, 'Overview')];
      if (o.counts) {
        const total = STATUSES.reduce((n, s) => n + (o.counts[s] || 0), 0);
        view.push(h('div.cards', {},
          h('div.card', {}, h('div.k', {}, 'TASKS'), h('div.n', { id: 'count-total' }, total)),
          STATUSES.map((s) => h('a.card', { href: '#/tasks?status=' + s },
            h('div.k', {}, s), h('div.n.s-' + s, { id: 'count-' + s }, o.counts[s] || 0)))));
      } else {
        view.push(h('p.notice.bad', {}, 'The registry could not be read: ' + o.counts_error));
      }
      const b = o.history.buckets;
      const done = b.reduce((n, x) => n + x.completed + x.failed, 0);
      const runN = b.reduce((n, x) => n + x.run_n, 0);
      const runSum = b.reduce((n, x) => n + x.run_ms_sum, 0);
      const totN = b.reduce((n, x) => n + x.total_n, 0);
      const totSum = b.reduce((n, x) => n + x.total_ms_sum, 0);
      view.push(h('h2', {}, 'Throughput and latency, last ' + Math.round(b.length * o.history.bucket_secs / 60) + ' minutes'));
      view.push(chart(o.history));
      view.push(h('p.muted', {},
        `${done} tasks finished while this dashboard listened (${o.listening_secs} s, ${o.events_heard} events heard)`,
        runN ? `; mean run time ${(runSum / runN).toFixed(1)} ms` : '',
        totN ? `, mean dispatch-to-end ${(totSum / totN).toFixed(1)} ms` : '', '.'));
      if (o.bus_error) view.push(h('p.notice.bad', {}, 'Not listening to the bus: ' + o.bus_error));
      view.push(h('h2', {}, 'Backends'));
      view.push(h('table', { id: 'roles' }, h('tr', {}, h('th', {}, 'role'), h('th', {}, 'backend'), h('th', {}, 'URL'), h('th', {}, 'guarantees')),
        o.roles.map((r) => h('tr', {}, h('td', {}, r.role), h('td', {}, h('b', {}, r.backend)), h('td.mono', {}, r.url || ''), h('td', {}, r.guarantees)))));
      view.push(h('p.muted', {}, 'agent-orchestra ' + o.version));
      return view;
    },

    async queues() {
      const q = await api('api/queues');
      const rows = q.queues.map((x) => h('tr', { dataset: { queue: x.queue } },
        h('td.mono', {}, h('a', { href: '#/tasks?queue=' + encodeURIComponent(x.queue) }, x.queue)),
        x.error ? h('td', { colspan: 3 }, h('span.s-FAILED', {}, x.error)) : [
          h('td.num', {}, x.waiting), h('td.num', {}, x.in_flight),
          h('td.num', {}, x.dead ? h('a', { href: '#/dead-letters?queue=' + encodeURIComponent(x.queue) }, x.dead) : 0)],
        h('td', {}, STATUSES.filter((st) => x.tasks && x.tasks[st]).map((st) => h('span', {}, statusEl(st), ' ' + x.tasks[st] + ' '))),
        h('td', { dataset: { paused: String(!!x.paused) } }, x.paused ? h('b.s-FAILED', {}, 'paused') : 'running'),
        h('td', {}, !q.actions.pause_resume ? '' : x.paused
          ? h('button', { dataset: { action: 'resume', queue: x.queue }, onclick: (e) => control('api/queues/' + encodeURIComponent(x.queue) + '/resume', () => x.queue + ' resumed', e.target) }, 'Resume')
          : h('button.danger', { dataset: { action: 'pause', queue: x.queue }, onclick: (e) => control('api/queues/' + encodeURIComponent(x.queue) + '/pause', () => x.queue + ' paused: workers claim nothing from it', e.target) }, 'Pause'))));
      return [h('h1', {}, 'Queues'),
        q.queues.length ? h('table', { id: 'queues' }, h('tr', {}, h('th', {}, 'queue'), h('th.num', {}, 'waiting'), h('th.num', {}, 'in flight'), h('th.num', {}, 'dead'), h('th', {}, 'tasks'), h('th', {}, 'state'), h('th', {}, '')), rows)
          : h('p.muted', {}, 'No queue known yet: queues appear when a task event or a worker announcement names them (or pass --queue).')];
    },

    async workers() {
      const w = await api('api/workers');
      const rows = w.workers.map((x) => h('tr', { dataset: { worker: x.worker_id } },
        h('td.mono', {}, x.worker_id), h('td', {}, x.host + ' (pid ' + x.pid + ')'),
        h('td.mono', {}, x.queues.join(', ')), h('td.num', {}, x.running.length + ' / ' + x.concurrency),
        h('td', {}, x.running.map((r) => h('div', {}, taskLink(r.task_id), ' ', h('span.muted', {}, 'attempt ' + r.attempt + ', since ' + ago(r.since))))),
        h('td', {}, ago(x.started_at)), h('td', {}, ago(x.seen_at)), h('td.muted', {}, x.version)));
      return [h('h1', {}, 'Workers'),
        w.workers.length ? h('table', { id: 'workers' }, h('tr', {}, ['worker', 'host', 'queues', 'busy', 'running', 'started', 'last heard', 'version'].map((t) => h('th', {}, t))), rows)
          : h('p.muted', {}, `No worker heard in the ${w.listening_secs} s this dashboard has listened (workers announce themselves every few seconds).`)];
    },

    async tasks(params) {
      const form = h('form.filters', { id: 'task-filters', onsubmit: (e) => {
        e.preventDefault();
        const p = new URLSearchParams();
        for (const k of ['status', 'queue', 'prefix']) { const v = form.elements[k].value.trim(); if (v) p.set(k, v); }
        location.hash = '#/tasks' + (p.toString() ? '?' + p : '');
      } },
      h('label', {}, 'status', h('select', { name: 'status' }, h('option', { value: '' }, 'any'),
        STATUSES.map((s) => h('option', { value: s, selected: params.get('status') === s }, s)))),
      h('label', {}, 'queue', h('input', { name: 'queue', value: params.get('queue') || '', placeholder: 'any' })),
      h('label', {}, 'id prefix', h('input', { name: 'prefix', value: params.get('prefix') || '', placeholder: 'any' })),
      h('button', { type: 'submit' }, 'Filter'));
      const q = new URLSearchParams(params);
      const page = await api('api/tasks?' + q);
      const rows = page.tasks.map((t) => h('tr', { dataset: { taskId: t.task_id } },
        h('td', {}, taskLink(t.task_id)), h('td.mono', {}, t.queue), h('td.status-cell', {}, statusEl(t.status)),
        h('td.num', {}, t.attempt + '/' + t.max_attempts), h('td', {}, fmtTime(t.updated_at)),
        h('td', {}, t.error ? h('span.muted', {}, t.error.slice(0, 120)) : ''), h('td.actions-cell', {}, taskButtons(t))));
      const more = page.next_cursor ? h('p', {}, h('a', { href: '#/tasks?' + new URLSearchParams({ ...Object.fromEntries(params), cursor: page.next_cursor }) }, 'next page →')) : null;
      return [h('h1', {}, 'Tasks'), form,
        page.tasks.length ? h('table', { id: 'tasks' }, h('tr', {}, ['task', 'queue', 'status', 'attempt', 'updated', 'error', ''].map((t) => h('th', {}, t))), rows)
          : h('p.muted', {}, 'No task matches.' + (page.scanned ? ` (${page.scanned} read)` : '')), more];
    },

    async task(params, id) {
      const d = await api('api/tasks/' + encodeURIComponent(id));
      const t = d.task, s = t; // the state's fields are the task's own (flattened)
      const summary = { task_id: t.task_id, status: s.status };
      return [h('h1', {}, 'Task ', h('span.mono', {}, t.task_id)),
        h('dl.kv', { id: 'task-detail', dataset: { taskId: t.task_id, status: s.status } },
          h('dt', {}, 'status'), h('dd.status-cell', {}, statusEl(s.status)),
          h('dt', {}, 'queue'), h('dd.mono', {}, h('a', { href: '#/tasks?queue=' + encodeURIComponent(t.queue) }, t.queue)),
          h('dt', {}, 'priority'), h('dd', {}, t.priority),
          h('dt', {}, 'attempts'), h('dd', {}, s.attempt + ' of ' + t.max_attempts + (s.handed_back ? ` (${s.handed_back} handed back)` : '')),
          h('dt', {}, 'worker'), h('dd.mono', {}, s.worker_id || ''),
          h('dt', {}, 'created'), h('dd', {}, fmtTime(t.created_at)),
          h('dt', {}, 'updated'), h('dd', {}, fmtTime(s.updated_at)),
          s.lease_until ? [h('dt', {}, 'lease until'), h('dd', {}, fmtTime(s.lease_until))] : [],
          s.progress !== undefined && s.progress !== null ? [h('dt', {}, 'progress'), h('dd.mono', { id: 'progress' }, json(s.progress))] : []),
        h('div.actions', { id: 'task-actions' }, taskButtons(summary)),
        h('div.grid2', {},
          h('div', {}, h('h2', {}, 'Payload'), h('pre', { id: 'payload' }, json(t.payload))),
          h('div', {}, h('h2', {}, s.error ? 'Error' : 'Result'), h('pre', { id: 'result' }, s.error ? s.error : (s.result === undefined || s.result === null ? '(none yet)' : json(s.result))))),
        h('div.grid2', {},
          h('div', {}, h('h2', {}, 'Depends on'), d.parents.length ? h('ul', {}, d.parents.map((p) => h('li', {}, taskLink(p.task_id), ' ', p.status ? statusEl(p.status) : h('span.muted', {}, 'gone')))) : h('p.muted', {}, 'nothing')),
          h('div', {}, h('h2', {}, 'Dependents'), d.dependents.length ? h('ul', {}, d.dependents.map((p) => h('li', {}, taskLink(p)))) : h('p.muted', {}, 'none'))),
        h('h2', {}, 'Timeline'),
        h('table', { id: 'timeline' }, d.timeline.map((e) => h('tr', {}, h('td', {}, fmtTime(e.at)), h('td', {}, e.what, e.event ? h('span.muted', {}, ' (event)') : '')))),
        h('p.muted', {}, 'The timeline holds the times the task records and the events this dashboard heard since it started.')];
    },

    async 'dead-letters'(params) {
      const q = await api('api/queues');
      const chosen = params.get('queue') || (q.queues.find((x) => x.dead) || q.queues[0] || {}).queue;
      const picker = h('form.filters', {}, h('label', {}, 'queue', h('select', { id: 'dead-queue', onchange: (e) => { location.hash = '#/dead-letters?queue=' + encodeURIComponent(e.target.value); } },
        q.queues.map((x) => h('option', { value: x.queue, selected: x.queue === chosen }, x.queue + (x.dead ? ` (${x.dead})` : ''))))));
      const view = [h('h1', {}, 'Dead letters'), picker];
      if (!chosen) return view.concat(h('p.muted', {}, 'No queue known yet.'));
      const d = await api('api/dead-letters?queue=' + encodeURIComponent(chosen));
      const can = d.actions.requeue_dead_letters;
      const base = 'api/dead-letters/' + encodeURIComponent(chosen) + '/';
      const one = (what, id) => base + what + '?id=' + encodeURIComponent(id);
      if (can && d.dead_letters.length) {
        view.push(h('div.actions', { id: 'dead-actions' },
          h('button', { dataset: { action: 'requeue-all' }, onclick: (e) => control(base + 'requeue?all=true', outcomesText, e.target) }, 'Requeue all'),
          h('button.danger', { dataset: { action: 'delete-all' }, onclick: (e) => { if (confirm('Delete every dead letter of ' + chosen + '?')) control(base + 'delete?all=true', outcomesText, e.target); } }, 'Delete all')));
      }
      view.push(d.dead_letters.length ? h('table', { id: 'dead-letters' }, h('tr', {}, ['message', 'task', 'reason', 'deliveries', 'dead since', 'payload', ''].map((t) => h('th', {}, t))),
        d.dead_letters.map((x) => h('tr', { dataset: { message: x.message_id } }, h('td.mono', {}, x.message_id), h('td', {}, x.task_id ? taskLink(x.task_id) : ''), h('td', {}, x.reason),
          h('td.num', {}, x.delivery_count), h('td', {}, fmtTime(x.dead_at)), h('td', {}, h('pre', {}, x.payload + (x.payload_bytes > x.payload.length ? ' …' : ''))),
          h('td.actions-cell', {}, can ? [
            h('button', { dataset: { action: 'requeue', message: x.message_id }, onclick: (e) => control(one('requeue', x.message_id), outcomesText, e.target) }, 'Requeue'),
            h('button.danger', { dataset: { action: 'delete', message: x.message_id }, onclick: (e) => control(one('delete', x.message_id), outcomesText, e.target) }, 'Delete')] : ''))))
        : h('p.muted', {}, 'No dead letter on ' + chosen + '.'));
      return view;
    },
  };

  // ---- routing and refresh -------------------------------------------------------------------

  function route() {
    const raw = (location.hash || '#/overview').slice(2);
    const [path, query] = raw.split('?');
    const parts = path.split('/');
    const params = new URLSearchParams(query || '');
    if (parts[0] === 'task' && parts[1]) return { page: 'task', arg: decodeURIComponent(parts[1]), params };
    return { page: pages[parts[0]] ? parts[0] : 'overview', arg: null, params };
  }

  async function paint() {
    if (state.painting) { refreshSoon(300); return; }
    state.painting = true;
    const r = route();
    const changed = !state.page || state.page.page !== r.page || state.page.arg !== r.arg || String(state.page.params) !== String(r.params);
    state.page = r;
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.page === (r.page === 'task' ? 'tasks' : r.page));
    const view = document.getElementById('view');
    try {
      const nodes = await pages[r.page](r.params, r.arg);
      // Keep the filter form (its focus, what is typed) across a live refresh of the same page.
      const active = document.activeElement;
      const oldForm = !changed && active && view.contains(active) ? active.form : null;
      view.replaceChildren(...nodes.flat().filter(Boolean).map((n) => (oldForm && n.tagName === 'FORM' ? oldForm : n)));
      document.body.dataset.page = r.page;
      document.body.dataset.painted = String(Date.now());
      if (changed) notice('');
    } catch (e) {
      view.replaceChildren(h('p.notice.bad', {}, e.message));
    } finally {
      state.painting = false;
    }
  }

  function refreshSoon(ms) {
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(() => { state.refreshTimer = null; paint(); }, ms === undefined ? 800 : ms);
  }

  function live() {
    const el = document.getElementById('live');
    const source = new EventSource(BASE + 'api/stream');
    source.addEventListener('hello', () => { el.textContent = 'live'; el.classList.remove('off'); });
    source.addEventListener('task', (m) => {
      const ev = JSON.parse(m.data);
      for (const row of document.querySelectorAll('[data-task-id="' + CSS.escape(ev.task_id) + '"]')) {
        const cell = row.querySelector('.status-cell');
        if (cell) cell.replaceChildren(statusEl(ev.status));
        row.dataset.status = ev.status;
      }
      if (['overview', 'queues', 'tasks', 'task', 'workers'].includes(state.page && state.page.page)) refreshSoon();
    });
    source.addEventListener('lagged', () => refreshSoon());
    source.onerror = () => { el.textContent = 'reconnecting…'; el.classList.add('off'); };
  }

  async function start() {
    const tokenInput = document.getElementById('token');
    tokenInput.value = state.token;
    tokenInput.addEventListener('change', () => { state.token = tokenInput.value.trim(); sessionStorage.setItem('orchestra-token', state.token); });
    try {
      const o = await api('api/overview');
      state.actions = o.actions;
      state.tokenRequired = o.token_required;
      document.getElementById('token-box').hidden = !o.token_required;
    } catch (e) {
      notice('The dashboard could not be read: ' + e.message, true);
    }
    window.addEventListener('hashchange', paint);
    live();
    await paint();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
