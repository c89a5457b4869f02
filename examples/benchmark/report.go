package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
)

// heapTargetMB is the peak heap pgstore must stay under while a large
// SetAsync run goes through the default buffer limit.
const heapTargetMB = 256

type kind int

const (
	throughput kind = iota // higher is better: ratio = pgstore/raw
	latency                // lower is better: ratio = raw/pgstore
	heap                   // raw is the target: ratio = target/pgstore
)

// figureDef describes one figure of the JSON line, in its order.
type figureDef struct {
	key, title, unit string
	kind             kind
	target           string
	minRatio         float64 // 0: no target
}

var figureDefs = []figureDef{
	{"write_fresh_feed", "write, fresh keys, feed on", "rec/s", throughput, "ratio ≥ 0.85", 0.85},
	{"write_update_feed", "write, updates, feed on", "rec/s", throughput, "ratio ≥ 0.85", 0.85},
	{"write_fresh_nofeed", "write, fresh keys, feed off", "rec/s", throughput, "ratio ≥ 0.85", 0.85},
	{"write_update_nofeed", "write, updates, feed off", "rec/s", throughput, "ratio ≥ 0.85", 0.85},
	{"write_fresh_log", "write, fresh keys, change log", "rec/s", throughput, "ratio ≥ 0.85", 0.85},
	{"write_update_log", "write, updates, change log", "rec/s", throughput, "ratio ≥ 0.85", 0.85},
	{"write_concurrent", "write, concurrent Set", "rec/s", throughput, "none", 0},
	{"get_p50", "Get latency p50", "µs", latency, "ratio ≥ 0.8", 0.8},
	{"get_p99", "Get latency p99", "µs", latency, "none", 0},
	{"get_concurrent", "Get, concurrent", "get/s", throughput, "none", 0},
	{"change_p50", "change latency p50", "µs", latency, "ratio ≥ 0.5", 0.5},
	{"change_p99", "change latency p99", "µs", latency, "none", 0},
	{"change_log_p50", "change latency p50, change log", "µs", latency, "ratio ≥ 0.5", 0.5},
	{"change_log_p99", "change latency p99, change log", "µs", latency, "none", 0},
	{"replay", "replay, subscription far behind the log", "ev/s", throughput, "ratio ≥ 0.8", 0.8},
	{"fanout", "write, 16 subscribers / 1, change log", "rec/s", throughput, "ratio ≥ 0.9", 0.9},
	{"fanout_raw", "write, 16 subscribers, pgstore / raw readers", "rec/s", throughput, "none", 0},
	{"peak_heap_mb", "peak heap, SetAsync run", "MB", heap, fmt.Sprintf("< %d MB", heapTargetMB), 1},
}

type value struct {
	pgstore, raw *float64
}

type report struct {
	server   string
	poolSize int
	values   map[string]value
	notes    []string
}

func newReport() *report { return &report{values: make(map[string]value)} }

// set records a figure; a NaN leaves that side unmeasured.
func (r *report) set(key string, pgstore, raw float64) {
	if !slices.ContainsFunc(figureDefs, func(d figureDef) bool { return d.key == key }) {
		panic("unknown figure " + key)
	}
	var v value
	if !math.IsNaN(pgstore) {
		v.pgstore = &pgstore
	}
	if !math.IsNaN(raw) {
		v.raw = &raw
	}
	r.values[key] = v
}

func (r *report) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func (d figureDef) ratio(v value) *float64 {
	if v.pgstore == nil || v.raw == nil || *v.pgstore <= 0 || *v.raw <= 0 {
		return nil
	}
	r := *v.pgstore / *v.raw
	if d.kind != throughput {
		r = *v.raw / *v.pgstore
	}
	return &r
}

// round keeps what the figure's unit can tell: whole records per second,
// tenths of microseconds and megabytes, ratios to three places.
func (d figureDef) round(x float64) float64 {
	if d.kind == throughput {
		return math.Round(x)
	}
	return math.Round(x*10) / 10
}

func (d figureDef) format(x *float64) string {
	if x == nil {
		return "—"
	}
	if d.kind == throughput {
		return fmt.Sprintf("%s %s", thousands(int64(math.Round(*x))), d.unit)
	}
	return fmt.Sprintf("%.1f %s", *x, d.unit)
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func (r *report) print(w io.Writer, s settings) {
	mode := "full"
	if s.quick {
		mode = "quick"
	}
	fmt.Fprintf(w, "\npgstore benchmark (%s run): PostgreSQL %s, GOMAXPROCS %d, %d-byte values, throughputs best of %d round(s)\n\n",
		mode, r.server, runtime.GOMAXPROCS(0), s.valueBytes, s.rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tpgstore\traw ceiling\tratio\ttarget\t")
	for _, d := range figureDefs {
		v, ok := r.values[d.key]
		if !ok {
			continue
		}
		rawCol := d.format(v.raw)
		if d.kind == heap {
			rawCol = "(target)"
		}
		ratio, verdict := "—", ""
		if q := d.ratio(v); q != nil {
			ratio = fmt.Sprintf("%.3f", *q)
			if d.minRatio > 0 {
				verdict = "  ok"
				if *q < d.minRatio {
					verdict = "  MISSED"
				}
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s%s\t\n", d.title, d.format(v.pgstore), rawCol, ratio, d.target, verdict)
	}
	tw.Flush()

	fmt.Fprintln(w, "\nNotes:")
	for _, n := range r.notes {
		fmt.Fprintln(w, "- "+n)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, r.json())
}

// json is the run's last line: for each figure measured or not, pgstore's
// value, the ceiling's and their ratio (null where not measured).
func (r *report) json() string {
	type entry struct {
		Pgstore *float64 `json:"pgstore"`
		Raw     *float64 `json:"raw"`
		Ratio   *float64 `json:"ratio"`
	}
	rounded := func(x *float64, f func(float64) float64) *float64 {
		if x == nil {
			return nil
		}
		y := f(*x)
		return &y
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, d := range figureDefs {
		v := r.values[d.key]
		e := entry{
			Pgstore: rounded(v.pgstore, d.round),
			Raw:     rounded(v.raw, d.round),
			Ratio:   rounded(d.ratio(v), func(x float64) float64 { return math.Round(x*1000) / 1000 }),
		}
		data, _ := json.Marshal(e) // cannot fail: pointers to finite floats
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%q:%s", d.key, data)
	}
	b.WriteByte('}')
	return b.String()
}
