/**
 * Reading the gateway's Prometheus metrics (GET /metrics, text exposition format 0.0.4) in the
 * browser: a parser, histogram quantiles computed as Prometheus' histogram_quantile does, and
 * differences between two scrapes (what happened in between).
 */

/** Parse the text format into samples {name, labels, value}. Comments and bad lines are skipped. */
export function parsePrometheus(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const sample = parseSample(line);
    if (sample) samples.push(sample);
  }
  return samples;
}

function parseSample(line) {
  const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
  if (!name) return null;
  let i = name[0].length;
  const labels = {};
  if (line[i] === "{") {
    i++;
    for (;;) {
      while (line[i] === " " || line[i] === ",") i++;
      if (line[i] === "}") {
        i++;
        break;
      }
      const label = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(line.slice(i));
      if (!label) return null;
      i += label[0].length;
      while (line[i] === " ") i++;
      if (line[i] !== "=" || line[i + 1] !== '"') return null;
      i += 2;
      let value = "";
      for (; i < line.length && line[i] !== '"'; i++) {
        if (line[i] === "\\") {
          i++;
          value += line[i] === "n" ? "\n" : line[i];
        } else {
          value += line[i];
        }
      }
      if (line[i] !== '"') return null;
      i++;
      labels[label[0]] = value;
    }
  }
  const fields = line.slice(i).trim().split(/\s+/);
  const value = parseValue(fields[0]);
  if (value === null) return null;
  return { name: name[0], labels, value };
}

function parseValue(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  if (text === "NaN") return NaN;
  const value = Number(text);
  return text !== undefined && text !== "" && !Number.isNaN(value) ? value : null;
}

/**
 * Sum samples named `name` by the value of label `by` (all into "" without `by`), keeping
 * only those `where` accepts.
 */
export function sumBy(samples, name, by = null, where = () => true) {
  const sums = new Map();
  for (const sample of samples) {
    if (sample.name !== name || !where(sample.labels)) continue;
    const key = by ? sample.labels[by] ?? "" : "";
    sums.set(key, (sums.get(key) ?? 0) + sample.value);
  }
  return sums;
}

/**
 * The cumulative buckets of histogram `name` (its `_bucket` series), summed over every label
 * but `by`: Map(label value → [{le, count}] sorted by le).
 */
export function histograms(samples, name, by) {
  const grouped = new Map();
  for (const sample of samples) {
    if (sample.name !== `${name}_bucket`) continue;
    const key = sample.labels[by] ?? "";
    const le = parseValue(sample.labels.le);
    if (le === null) continue;
    const buckets = grouped.get(key) ?? new Map();
    buckets.set(le, (buckets.get(le) ?? 0) + sample.value);
    grouped.set(key, buckets);
  }
  const result = new Map();
  for (const [key, buckets] of grouped) {
    result.set(
      key,
      [...buckets].map(([le, count]) => ({ le, count })).sort((a, b) => a.le - b.le),
    );
  }
  return result;
}

/** `after` minus `before`, bucket by bucket (what was observed between two scrapes). */
export function subtractBuckets(after, before) {
  if (!before) return after;
  const earlier = new Map(before.map((b) => [b.le, b.count]));
  return after.map((b) => ({ le: b.le, count: Math.max(0, b.count - (earlier.get(b.le) ?? 0)) }));
}

/**
 * The q-quantile (0..1) of cumulative buckets, as Prometheus' histogram_quantile computes
 * it: linear interpolation inside the bucket holding the rank; the upper bound of the last
 * finite bucket when the rank falls in +Inf; null without observations.
 */
export function quantile(q, buckets) {
  if (!buckets.length) return null;
  const total = buckets[buckets.length - 1].count;
  if (!(total > 0)) return null;
  if (buckets[buckets.length - 1].le !== Infinity) return null; // a histogram always has +Inf
  const rank = q * total;
  let index = buckets.findIndex((b) => b.count >= rank);
  if (index < 0) index = buckets.length - 1;
  if (buckets[index].le === Infinity) return buckets.length > 1 ? buckets[buckets.length - 2].le : null;
  const upper = buckets[index].le;
  const lower = index > 0 ? buckets[index - 1].le : 0;
  const below = index > 0 ? buckets[index - 1].count : 0;
  const inBucket = buckets[index].count - below;
  if (inBucket <= 0) return upper;
  if (index === 0 && upper <= 0) return upper;
  return lower + (upper - lower) * ((rank - below) / inBucket);
}
