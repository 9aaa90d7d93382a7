// The dashboard: prices table, candlestick chart, market analytics and pipeline health, all read
// from the app's JSON views and kept live by the push feed (/stream/prices).
//
// Decimals arrive as JSON strings and are shown as those strings: never through Number(), so the
// table shows exactly the digits stored, and compared as strings (compareDecimals). Numbers are
// used only where nothing is shown: plotly's axes, and the table's order by market cap.
"use strict";

const INTERVALS = { "1m": 60e3, "5m": 300e3, "15m": 900e3, "1h": 3600e3, "4h": 14400e3, "1d": 864e5 };
const DEFAULT_INTERVAL = "15m";
const CANDLES_SHOWN = 120;
const RANGE_FETCHES = 4; // concurrent /prices/{coin} requests while the table fills
const HEALTH_EVERY_MS = 5000;
const FEED_RETRY_MS = 10000;
const ANALYTICS_EVERY_MS = 30000;

const query = new URLSearchParams(location.search);
const state = {
  coins: new Map(), // coin_id -> {price, range_24h}, as GET /prices/{coin_id} answers
  coin: query.get("coin"),
  interval: query.get("interval") || DEFAULT_INTERVAL,
  candles: null, // the chart's candles (oldest first) once loaded; null while none are shown
};

const $ = (selector) => document.querySelector(selector);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function showMessage(id, text) {
  const box = $(id);
  box.textContent = text;
  box.hidden = !text;
}

// Instead of the chart: why there is none.
function chartMessage(text) {
  showMessage("#chart-message", text);
  $("#chart").hidden = true;
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON: reported below with the status
  }
  return { status: response.status, ok: response.ok, body };
}

function utc(iso) {
  return iso ? iso.replace("T", " ").replace(/(\.\d+)?(Z|[+-]\d\d:\d\d)$/, "") : "–";
}

// 1234567.5 -> 1,234,567.5 on the string: the digits stay the ones stored.
function grouped(decimal) {
  if (decimal === null || decimal === undefined) return "–";
  const [whole, fraction] = String(decimal).split(".");
  const withCommas = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return fraction === undefined ? withCommas : `${withCommas}.${fraction}`;
}

// The order of two non-negative decimal strings in plain notation (as the views write them),
// exactly: -1, 0 or 1.
function compareDecimals(a, b) {
  const [aWhole, aFraction = ""] = a.split(".");
  const [bWhole, bFraction = ""] = b.split(".");
  const x = aWhole.replace(/^0+(?=\d)/, "");
  const y = bWhole.replace(/^0+(?=\d)/, "");
  if (x.length !== y.length) return Math.sign(x.length - y.length);
  const width = Math.max(aFraction.length, bFraction.length);
  const left = x + aFraction.padEnd(width, "0");
  const right = y + bFraction.padEnd(width, "0");
  return left === right ? 0 : left < right ? -1 : 1;
}

const maxDecimal = (a, b) => (compareDecimals(a, b) >= 0 ? a : b);
const minDecimal = (a, b) => (compareDecimals(a, b) <= 0 ? a : b);

// A 24 h range that a newer price widens (until the next load narrows it to the window again).
function widened(range, value) {
  if (!range || range.high === null || range.low === null) return range;
  return { ...range, high: maxDecimal(range.high, value), low: minDecimal(range.low, value) };
}

function signClass(decimal) {
  if (!decimal || /^-?0*\.?0*$/.test(decimal)) return "";
  return decimal.startsWith("-") ? "down" : "up";
}

// ---- prices table ------------------------------------------------------------------------------

function row(coinId) {
  let tr = document.querySelector(`#prices tbody tr[data-coin="${CSS.escape(coinId)}"]`);
  if (!tr) {
    tr = element("tr");
    tr.dataset.coin = coinId;
    const link = element("a", coinId);
    link.href = `?${new URLSearchParams({ coin: coinId, interval: state.interval })}`;
    const name = element("td", null, "coin");
    name.append(link);
    tr.append(name, element("td", "–", "price"), element("td", "–", "change"),
      element("td", "…", "high"), element("td", "…", "low"), element("td", "–", "updated"));
    $("#prices tbody").append(tr);
  }
  return tr;
}

function newer(price, known) {
  return !known || Date.parse(price.last_updated) >= Date.parse(known.price.last_updated);
}

// One coin as GET /prices/{coin_id} (and the push feed) answers it; range_24h may be absent
// (GET /prices has none): the row keeps the range it has.
function showCoin(price, range) {
  const known = state.coins.get(price.coin_id);
  if (!newer(price, known)) return false;
  const entry = { price, range_24h: range || (known && known.range_24h) };
  state.coins.set(price.coin_id, entry);
  const tr = row(price.coin_id);
  const link = tr.querySelector("td.coin a");
  link.textContent = `${price.name} (${price.symbol.toUpperCase()})`;
  tr.querySelector("td.price").textContent = price.usd_price;
  const change = tr.querySelector("td.change");
  change.textContent = price.change_24h === null ? "–" : `${price.change_24h} %`;
  change.className = `change ${signClass(price.change_24h)}`;
  if (entry.range_24h) {
    tr.querySelector("td.high").textContent = entry.range_24h.high ?? "–";
    tr.querySelector("td.low").textContent = entry.range_24h.low ?? "–";
  }
  const updated = tr.querySelector("td.updated");
  updated.textContent = utc(price.last_updated).slice(11); // the time; the date on hover
  updated.title = utc(price.last_updated);
  $("#prices-count").textContent = `${state.coins.size} coins`;
  return true;
}

function sortRows() {
  const capital = (tr) => Number(state.coins.get(tr.dataset.coin)?.price.market_cap ?? -1);
  const body = $("#prices tbody");
  [...body.rows].sort((a, b) => capital(b) - capital(a)).forEach((tr) => body.append(tr));
}

async function loadPrices() {
  const answer = await getJSON("/prices");
  if (!answer.ok) {
    showMessage("#prices-message", `Could not load prices: ${answer.body?.error ?? answer.status}`);
    return [];
  }
  showMessage("#prices-message", answer.body.count ? "" : "No prices stored yet.");
  for (const price of Object.values(answer.body.prices)) showCoin(price, null);
  sortRows();
  return Object.keys(answer.body.prices);
}

async function loadRanges(coinIds) {
  const queue = [...coinIds];
  const worker = async () => {
    for (let coinId = queue.shift(); coinId; coinId = queue.shift()) {
      const answer = await getJSON(`/prices/${encodeURIComponent(coinId)}`);
      if (answer.ok) showCoin(answer.body.price, answer.body.range_24h);
    }
  };
  await Promise.all(Array.from({ length: RANGE_FETCHES }, worker));
}

function flash(coinId) {
  const tr = row(coinId);
  tr.classList.remove("flash");
  void tr.offsetWidth; // restart the highlight
  tr.classList.add("flash");
  setTimeout(() => tr.classList.remove("flash"), 1500);
}

// ---- push feed ---------------------------------------------------------------------------------

function connectFeed() {
  const feed = new EventSource("/stream/prices");
  const badge = $("#feed");
  feed.onopen = () => {
    badge.textContent = "live";
    badge.className = "badge ok";
  };
  feed.onerror = () => {
    badge.className = "badge bad";
    if (feed.readyState !== EventSource.CLOSED) {
      badge.textContent = "reconnecting…"; // EventSource retries by itself, with Last-Event-ID
      return;
    }
    // Refused (an error status, e.g. too many clients): EventSource gives up, so start anew and
    // reload the prices, which covers whatever was pushed meanwhile.
    badge.textContent = "feed refused: retrying…";
    setTimeout(() => {
      connectFeed();
      loadPrices();
    }, FEED_RETRY_MS);
  };
  feed.addEventListener("dropped", () => {
    badge.textContent = "fell behind: resuming…";
    badge.className = "badge bad";
  });
  feed.addEventListener("price", (event) => {
    // The stored price record; also taken in the shape of GET /prices/{coin_id} (with its range).
    const pushed = JSON.parse(event.data);
    const price = pushed.price ?? pushed;
    const known = state.coins.get(price.coin_id)?.range_24h;
    if (showCoin(price, pushed.range_24h ?? widened(known, price.usd_price))) {
      flash(price.coin_id);
      extendChart(price);
    }
  });
}

// ---- chart -------------------------------------------------------------------------------------

// Plotly's date axis takes naive times: the page shows UTC throughout.
const plotTime = (ms) => new Date(ms).toISOString().slice(0, 19).replace("T", " ");

function drawChart() {
  const candles = state.candles;
  const trace = {
    type: "candlestick",
    name: state.coin,
    x: candles.map((candle) => plotTime(candle.ms)),
    open: candles.map((candle) => candle.open),
    high: candles.map((candle) => candle.high),
    low: candles.map((candle) => candle.low),
    close: candles.map((candle) => candle.close),
  };
  const layout = {
    title: { text: `${state.coin} · ${state.interval} candles (UTC)` },
    margin: { l: 70, r: 20, t: 40, b: 40 },
    xaxis: { rangeslider: { visible: false }, type: "date" },
    yaxis: { tickformat: "~g" },
    uirevision: `${state.coin}/${state.interval}`, // keep the user's zoom across updates
  };
  Plotly.react("chart", [trace], layout, { displaylogo: false, responsive: true });
}

// A pushed price of the chart's coin updates the last candle or starts the next one.
function extendChart(price) {
  if (!state.candles || price.coin_id !== state.coin || price.exchange_id !== "aggregate") return;
  const width = INTERVALS[state.interval];
  const at = Date.parse(price.last_updated);
  const last = state.candles[state.candles.length - 1];
  const value = price.usd_price;
  if (last && at < last.ms) return; // older than the chart's newest candle
  if (last && at < last.ms + width) {
    last.high = maxDecimal(last.high, value);
    last.low = minDecimal(last.low, value);
    last.close = value;
  } else {
    // Candles share their boundaries (all start on a whole number of widths from one origin).
    const origin = last ? last.ms : 0;
    const start = origin + Math.floor((at - origin) / width) * width;
    state.candles.push({ ms: start, open: value, high: value, low: value, close: value });
  }
  drawChart();
}

async function loadChart(coinIds) {
  const coinSelect = $("#coin-select");
  for (const coinId of new Set([...coinIds, state.coin].filter(Boolean))) {
    coinSelect.append(new Option(coinId, coinId, false, coinId === state.coin));
  }
  const intervalSelect = $("#interval-select");
  for (const name of Object.keys(INTERVALS)) {
    intervalSelect.append(new Option(name, name, false, name === state.interval));
  }
  const navigate = () => {
    location.search = `?${new URLSearchParams({ coin: coinSelect.value, interval: intervalSelect.value })}`;
  };
  coinSelect.onchange = navigate;
  intervalSelect.onchange = navigate;

  if (!state.coin) {
    chartMessage("No coin to chart yet: no prices are stored.");
    return;
  }
  if (!(state.interval in INTERVALS)) {
    chartMessage(
      `Unknown interval "${state.interval}": choose one of ${Object.keys(INTERVALS).join(", ")}.`);
    return;
  }
  const since = new Date(Date.now() - CANDLES_SHOWN * INTERVALS[state.interval]).toISOString();
  const params = new URLSearchParams({ interval: state.interval, since });
  const answer = await getJSON(`/prices/${encodeURIComponent(state.coin)}/candles?${params}`);
  if (answer.status === 404) {
    chartMessage(
      `No prices for coin "${state.coin}": it is not a tracked coin. Pick one from the table.`);
    return;
  }
  if (!answer.ok) {
    chartMessage(
      `Cannot chart "${state.coin}": ${answer.body?.error ?? `HTTP ${answer.status}`}`);
    return;
  }
  state.candles = answer.body.candles.map((candle) => ({ ...candle, ms: Date.parse(candle.time) }));
  drawChart();
  // Prices pushed while the candles loaded are already in the table: fold in the newest.
  const known = state.coins.get(state.coin);
  if (known) extendChart(known.price);
}

// ---- analytics and health ----------------------------------------------------------------------

function describe(list, pairs) {
  list.replaceChildren(...pairs.flatMap(([term, value, className]) =>
    [element("dt", term), element("dd", value ?? "–", className)]));
}

async function loadAnalytics() {
  const answer = await getJSON("/analytics");
  if (!answer.ok) return;
  const pairs = [];
  for (const [source, stats] of Object.entries(answer.body.analytics)) {
    pairs.push(
      ["source", `${source} · ${utc(stats.timestamp)}`],
      ["market cap (USD)", grouped(stats.total_market_cap)],
      ["24 h volume (USD)", grouped(stats.total_volume)],
      ["market cap 24 h", stats.market_cap_change_24h && `${stats.market_cap_change_24h} %`,
        signClass(stats.market_cap_change_24h)],
      ["BTC dominance", stats.btc_dominance && `${stats.btc_dominance} %`],
      ["ETH dominance", stats.eth_dominance && `${stats.eth_dominance} %`],
      ["active coins", grouped(stats.active_cryptocurrencies)],
      ["markets", grouped(stats.markets)],
    );
  }
  describe($("#analytics"), pairs.length ? pairs : [["analytics", "none stored yet"]]);
}

const seconds = (value) => (value === null || value === undefined ? "never" : `${value} s ago`);

async function loadHealth() {
  const answer = await getJSON("/health");
  const badge = $("#health-status");
  const health = answer.body;
  if (!health || !health.status) {
    badge.textContent = `health: HTTP ${answer.status}`;
    badge.className = "badge bad";
    return;
  }
  badge.textContent = `pipeline ${health.status}`;
  badge.className = `badge ${health.status === "ok" ? "ok" : "bad"}`;
  const poller = health.poller;
  const stored = poller.stored || {};
  const pairs = [
    ["broker", health.broker.connected ? "connected" : "not connected"],
    ["database", health.database.reachable ? "reachable" : "unreachable"],
    ["polls here", poller.polls_here ? `yes (${poller.process})` : `no (${poller.process})`],
  ];
  if (poller.polls_here) {
    for (const [name, endpoint] of Object.entries(poller.endpoints)) {
      pairs.push([`poll ${name}`, endpoint.last_error ? `${seconds(endpoint.age_seconds)}; ${endpoint.last_error}`
        : seconds(endpoint.age_seconds), endpoint.last_error ? "down" : ""]);
    }
  }
  for (const [table, fresh] of Object.entries(stored)) {
    pairs.push([`${table} stored`, seconds(fresh.stored_age_seconds)]);
  }
  for (const [topic, sink] of Object.entries(health.sink)) {
    const failing = sink.consecutive_failures > 0;
    pairs.push([`${topic} rows`, grouped(sink.rows_written)]);
    pairs.push([`${topic} dead letters`, String(sink.dead_letters), sink.dead_letters ? "down" : ""]);
    if (failing) pairs.push([`${topic} failing`, sink.last_error, "down"]);
  }
  describe($("#health"), pairs);
}

function every(milliseconds, load) {
  const run = () => load().catch(() => undefined).finally(() => setTimeout(run, milliseconds));
  run();
}

async function main() {
  connectFeed(); // first, so no price stored while the page loads is missed
  const coinIds = await loadPrices();
  state.coin = state.coin || (coinIds.includes("bitcoin") ? "bitcoin" : coinIds[0]);
  await loadChart(coinIds);
  every(HEALTH_EVERY_MS, loadHealth);
  every(ANALYTICS_EVERY_MS, loadAnalytics);
  await loadRanges(coinIds);
}

main();
