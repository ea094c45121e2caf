// The live-table demo: the rows of the demo table, kept live by centrifuge-js.
//
// State = snapshot (GET api/rows) + change events from the channel. The subscription comes
// first, the snapshot second; events that arrive while the snapshot loads are applied after
// it. Events carry the whole row and its version, deletes leave a tombstone, so applying an
// event twice or out of order against the snapshot cannot show a stale or deleted row.
// After a reconnect the SDK resubscribes with the last offset: when the server says
// `recovered`, the missed events follow and nothing is reloaded; otherwise the snapshot is
// loaded again (the history did not reach back far enough).
'use strict';

(() => {
  const MAX_ROWS = 1000; // the newest rows shown; the snapshot sends as many
  const MAX_TOMBSTONES = 10000;
  const MAX_BUFFERED = 5000; // events held while a snapshot loads; past it, load again
  const MAX_LOG = 40;

  const $ = (id) => document.getElementById(id);
  const tbody = $('rows');

  const rows = new Map(); // id -> { row, tr }
  const tombstones = new Set();
  const stats = {
    state: 'disconnected',
    node: null,
    client: null,
    channel: null,
    epoch: null,
    lastOffset: null,
    publications: 0,
    duplicates: 0,
    gaps: 0,
    snapshots: 0,
    recoveredReconnects: 0,
  };
  let buffered = null; // events held while a snapshot loads (null: none loading)
  let snapshotGeneration = 0;

  // ---- the page ----------------------------------------------------------------------------

  function log(text, kind = '') {
    insertRun = null;
    const li = document.createElement('li');
    li.className = kind;
    const time = document.createElement('time');
    time.textContent = new Date().toLocaleTimeString();
    li.append(time, ' ', text);
    $('log').prepend(li);
    while ($('log').children.length > MAX_LOG) $('log').lastElementChild.remove();
    return li;
  }

  /// Consecutive inserts share one log line: "@201–400 + 200 rows #201–#400".
  let insertRun = null;
  function logInsert(row, offset) {
    if (insertRun && insertRun.li.isConnected) {
      const run = insertRun;
      run.count += 1;
      run.lastId = row.id;
      run.lastOffset = offset ?? run.lastOffset;
      const offsets = run.firstOffset ? `@${run.firstOffset}–${run.lastOffset} ` : '';
      run.li.lastChild.textContent = `${offsets}+ ${run.count} rows #${run.firstId}–#${run.lastId}`;
      return;
    }
    const li = log(`${offset ? `@${offset} ` : ''}+ #${row.id} ${row.label}`, 'insert');
    insertRun = { li, count: 1, firstId: row.id, lastId: row.id, firstOffset: offset, lastOffset: offset };
  }

  function show(id, text) {
    const el = $(id);
    el.textContent = text;
    el.title = text;
  }

  function render() {
    $('state').textContent = stats.state;
    $('state-dot').className = `dot ${stats.state}`;
    show('node', stats.node ?? '—');
    show('channel', stats.channel ?? '—');
    $('offset').textContent = stats.lastOffset ?? '—';
    show('epoch', stats.epoch ?? '—');
    $('publications').textContent = stats.publications;
    $('recovered').textContent = stats.recoveredReconnects;
    $('row-count').textContent = rows.size;
    $('empty').hidden = rows.size > 0;
  }

  let renderQueued = false;
  function renderSoon() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function cell(text, className) {
    const td = document.createElement('td');
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function button(text, title, onClick) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = text;
    b.title = title;
    b.addEventListener('click', onClick);
    return b;
  }

  function fillRow(tr, row) {
    const updated = new Date(row.updated_at);
    const actions = document.createElement('td');
    actions.className = 'actions';
    actions.append(
      button('+1', 'UPDATE … SET value = value + 1', () => api('POST', `api/rows/${row.id}/bump`)),
      button('✕', 'DELETE this row', () => api('DELETE', `api/rows/${row.id}`)),
    );
    tr.replaceChildren(
      cell(row.id, 'num'),
      cell(row.label),
      cell(row.value, 'num'),
      cell(row.version, 'num'),
      cell(isNaN(updated) ? '' : updated.toLocaleTimeString()),
      actions,
    );
  }

  const FLASH = { new: '#d5f5e3', changed: '#fff1c2' };
  /// A short highlight (Web Animations: no class juggling, no forced layout per row).
  function flash(tr, kind) {
    tr.animate([{ backgroundColor: FLASH[kind] }, { backgroundColor: 'transparent' }], {
      duration: 1200,
      easing: 'ease-out',
    });
  }

  /// Inserts the row's element in id order (newest first); new ids usually go on top.
  function place(tr, id) {
    let before = tbody.firstElementChild;
    while (before && Number(before.dataset.id) > id) before = before.nextElementSibling;
    tbody.insertBefore(tr, before);
  }

  function upsert(row) {
    const have = rows.get(row.id);
    if (have) {
      have.row = row;
      fillRow(have.tr, row);
      flash(have.tr, 'changed');
      return;
    }
    const tr = document.createElement('tr');
    tr.dataset.id = row.id;
    fillRow(tr, row);
    place(tr, row.id);
    rows.set(row.id, { row, tr });
    flash(tr, 'new');
    if (rows.size > MAX_ROWS) remove(Math.min(...rows.keys()), false);
  }

  function remove(id, animate) {
    const have = rows.get(id);
    if (!have) return;
    rows.delete(id);
    if (!animate) return have.tr.remove();
    delete have.tr.dataset.id;
    have.tr.classList.add('gone');
    setTimeout(() => have.tr.remove(), 700);
  }

  function tombstone(id) {
    tombstones.add(id);
    if (tombstones.size > MAX_TOMBSTONES) tombstones.delete(tombstones.values().next().value);
  }

  // ---- state: snapshot + events --------------------------------------------------------------

  /// Applies one change event: {op: INSERT|UPDATE|DELETE, row: {...}}, published at `offset`.
  function apply({ event, offset }) {
    const at = offset ? `@${offset} ` : '';
    const row = event && event.row;
    if (!row || typeof row.id !== 'number') return;
    if (event.op === 'DELETE') {
      tombstone(row.id);
      remove(row.id, true);
      log(`${at}− #${row.id} ${row.label}`, 'delete');
      return;
    }
    if (tombstones.has(row.id)) return;
    const have = rows.get(row.id);
    if (have && have.row.version >= row.version) return;
    upsert(row);
    if (have) log(`${at}~ #${row.id} ${row.label}: value ${row.value}`, 'update');
    else logInsert(row, offset);
  }

  function onEvent(change) {
    if (buffered === null) return apply(change);
    buffered.push(change);
    if (buffered.length > MAX_BUFFERED) loadSnapshot('too many changes while loading');
  }

  async function loadSnapshot(why) {
    const generation = ++snapshotGeneration;
    buffered = [];
    log(`loading the table (${why})`, 'info');
    for (let attempt = 0; generation === snapshotGeneration; attempt++) {
      try {
        const snapshot = await api('GET', 'api/rows');
        if (generation !== snapshotGeneration) return;
        const events = buffered;
        buffered = null;
        stats.snapshots += 1;
        for (const id of [...rows.keys()]) remove(id, false);
        const sorted = snapshot.rows.slice().sort((a, b) => b.id - a.id);
        const fragment = document.createDocumentFragment();
        for (const row of sorted) {
          if (tombstones.has(row.id)) continue;
          const tr = document.createElement('tr');
          tr.dataset.id = row.id;
          fillRow(tr, row);
          fragment.append(tr);
          rows.set(row.id, { row, tr });
        }
        tbody.replaceChildren(fragment);
        for (const change of events) apply(change);
        log(`table loaded: ${rows.size} rows`, 'info');
        renderSoon();
        return;
      } catch (err) {
        log(`loading the table failed (${err.message}); retrying`, 'error');
        await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** attempt)));
      }
    }
  }

  // ---- the tiny HTTP API ---------------------------------------------------------------------

  async function api(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: body ? { 'content-type': 'application/json' } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${response.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  $('insert-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const label = $('label').value.trim();
    const count = Number($('count').value);
    $('insert').disabled = true;
    $('form-status').textContent = 'inserting…';
    try {
      const result = await api('POST', 'api/rows', { label, count });
      $('form-status').textContent = `inserted ${result.inserted}`;
    } catch (err) {
      $('form-status').textContent = `failed: ${err.message}`;
    } finally {
      $('insert').disabled = false;
    }
  });

  // ---- the connection ------------------------------------------------------------------------

  /// The browser's WebSocket, noting the `node` field of pgfanout's connect reply (the SDK
  /// keeps only the fields Centrifugo defines).
  class NodeAwareWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      const sniff = (e) => {
        if (typeof e.data !== 'string') return;
        for (const line of e.data.split('\n')) {
          if (!line.includes('"connect"')) continue;
          try {
            const reply = JSON.parse(line);
            if (reply.connect) {
              stats.node = reply.connect.node ?? '(not reported)';
              this.removeEventListener('message', sniff);
              return;
            }
          } catch {}
        }
      };
      this.addEventListener('message', sniff);
    }
  }

  async function start() {
    const config = await api('GET', 'api/config');
    stats.channel = config.channel;
    $('table-name').textContent = config.table;
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/connection/websocket`;
    const options = {
      websocket: NodeAwareWebSocket,
      name: 'live-table-demo',
      minReconnectDelay: 200,
      maxReconnectDelay: 5000,
    };
    if (config.tokens) {
      // The node signs short tokens for the demo channel; the SDK asks again before one ends.
      options.getToken = async () => {
        const { token, expires_in: ttl } = await api('GET', 'api/token');
        log(`got a connection token (valid ${Math.round(ttl / 60)} min)`, 'info');
        return token;
      };
    }
    const client = new Centrifuge(url, options);
    client.on('state', (ctx) => {
      stats.state = ctx.newState;
      renderSoon();
    });
    client.on('connecting', (ctx) => {
      stats.node = null;
      log(`connecting (${ctx.reason}${ctx.code ? `, code ${ctx.code}` : ''})`, 'conn');
    });
    client.on('connected', (ctx) => {
      stats.client = ctx.client;
      log(`connected to node ${stats.node} as ${ctx.client.slice(0, 8)}…`, 'conn');
      renderSoon();
    });
    client.on('disconnected', (ctx) => log(`disconnected (${ctx.reason}, code ${ctx.code})`, 'error'));

    const sub = client.newSubscription(config.channel);
    sub.on('subscribed', (ctx) => {
      const position = ctx.streamPosition;
      stats.epoch = position ? position.epoch : null;
      if (ctx.wasRecovering && ctx.recovered) {
        stats.recoveredReconnects += 1;
        const missed = position ? position.offset - (stats.lastOffset ?? 0) : 0;
        log(`resubscribed: recovered ${missed} missed publication(s)`, 'conn');
      } else {
        // First subscribe, or the history did not reach back: reload, count offsets anew.
        stats.lastOffset = position ? position.offset : null;
        loadSnapshot(ctx.wasRecovering ? 'could not recover, reloading' : 'subscribed');
      }
      renderSoon();
    });
    sub.on('publication', (ctx) => {
      stats.publications += 1;
      if (typeof ctx.offset === 'number') {
        if (stats.lastOffset !== null && ctx.offset <= stats.lastOffset) stats.duplicates += 1;
        if (stats.lastOffset !== null && ctx.offset > stats.lastOffset + 1) stats.gaps += 1;
        stats.lastOffset = Math.max(stats.lastOffset ?? 0, ctx.offset);
      }
      onEvent({ event: ctx.data, offset: ctx.offset });
      renderSoon();
    });
    sub.on('error', (ctx) => log(`subscription error: ${ctx.error.message}`, 'error'));
    sub.subscribe();
    client.connect();
  }

  /// For tests and the curious: the numbers behind the page.
  window.liveTable = {
    stats: () => ({ ...stats, rows: rows.size, loading: buffered !== null }),
    rowIds: () => [...rows.keys()],
  };

  render();
  start().catch((err) => log(`cannot start: ${err.message}`, 'error'));
})();
