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

type kind int

const (
	throughput kind = iota // higher is better: ratio = broker/ceiling
	latency                // lower is better: ratio = ceiling/broker
)

// figureDef describes one figure of the table and the JSON line, in their
// order. A figure of the ceiling alone (a part of another's) has no
// broker value and no ratio.
type figureDef struct {
	key, title, unit string
	kind             kind
	target           string
	minRatio         float64 // 0: no target
}

var figureDefs = []figureDef{
	{"publish", "publish, 8 publishers / pgstore concurrent Set", "pub/s", throughput, "ratio ≥ 0.5", 0.5},
	{"publish_memory", "publish, 8 publishers / memory broker", "pub/s", throughput, "none", 0},
	{"latency_p50", "publish → handler p50 / 2×(Set→handler + memory)", "µs", latency, "ratio ≥ 1", 1},
	{"latency_p99", "publish → handler p99 / 2×(Set→handler + memory)", "µs", latency, "none", 0},
	{"latency_other_node_p50", "publish → other node's handler p50 / 2×(Set→handler + memory)", "µs", latency, "ratio ≥ 1", 1},
	{"latency_other_node_p99", "publish → other node's handler p99 / 2×(Set→handler + memory)", "µs", latency, "none", 0},
	{"set_latency_p50", "  of which: pgstore Set → handler on another connector, p50", "µs", latency, "", 0},
	{"set_latency_p99", "  of which: pgstore Set → handler on another connector, p99", "µs", latency, "", 0},
	{"memory_latency_p50", "  of which: memory broker publish → handler, p50", "µs", latency, "", 0},
	{"memory_latency_p99", "  of which: memory broker publish → handler, p99", "µs", latency, "", 0},
}

type value struct {
	broker, ceiling *float64
}

type report struct {
	server string
	values map[string]value
	notes  []string
}

func newReport() *report { return &report{values: make(map[string]value)} }

// set records a figure; a NaN leaves that side unmeasured.
func (r *report) set(key string, broker, ceiling float64) {
	if !slices.ContainsFunc(figureDefs, func(d figureDef) bool { return d.key == key }) {
		panic("unknown figure " + key)
	}
	var v value
	if !math.IsNaN(broker) {
		v.broker = &broker
	}
	if !math.IsNaN(ceiling) {
		v.ceiling = &ceiling
	}
	r.values[key] = v
}

func (r *report) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

func (d figureDef) ratio(v value) *float64 {
	if v.broker == nil || v.ceiling == nil || *v.broker <= 0 || *v.ceiling <= 0 {
		return nil
	}
	r := *v.broker / *v.ceiling
	if d.kind == latency {
		r = *v.ceiling / *v.broker
	}
	return &r
}

// round keeps what the figure's unit can tell: whole publications per
// second, tenths of microseconds.
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
	if d.kind == latency && *x < 100 {
		return fmt.Sprintf("%.1f %s", *x, d.unit)
	}
	return fmt.Sprintf("%s %s", thousands(int64(math.Round(*x))), d.unit)
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 && c != '-' {
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
	fmt.Fprintf(w, "\npgstore map broker benchmark (%s run): PostgreSQL %s, GOMAXPROCS %d, %d-byte data, %d publishers, throughputs best of %d round(s)\n\n",
		mode, r.server, runtime.GOMAXPROCS(0), s.valueBytes, s.goroutines, s.rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "figure\tpgstore broker\tceiling\tratio\ttarget\t")
	for _, d := range figureDefs {
		v, ok := r.values[d.key]
		if !ok {
			continue
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
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s%s\t\n", d.title, d.format(v.broker), d.format(v.ceiling), ratio, d.target, verdict)
	}
	tw.Flush()

	fmt.Fprintln(w, "\nNotes:")
	for _, n := range r.notes {
		fmt.Fprintln(w, "- "+n)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, r.json())
}

// json is the run's last line: for each figure measured or not, the
// broker's value, the ceiling's and their ratio (null where not measured).
func (r *report) json() string {
	type entry struct {
		Broker  *float64 `json:"broker"`
		Ceiling *float64 `json:"ceiling"`
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
			Broker:  rounded(v.broker, d.round),
			Ceiling: rounded(v.ceiling, d.round),
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
