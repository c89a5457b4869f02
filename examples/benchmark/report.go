package main

import (
	"fmt"
	"io"
	"runtime"

	"github.com/pgstore/pgstore/internal/benchkit"
)

// heapTargetMB is the peak heap pgstore must stay under while a large
// SetAsync run goes through the default buffer limit.
const heapTargetMB = 256

const (
	throughput = benchkit.Throughput // higher is better: ratio = pgstore/raw
	latency    = benchkit.Latency    // lower is better: ratio = raw/pgstore
)

// table lays out the figures of the table and of the JSON line, in their
// order. The heap figure's ceiling is its target: ratio = target/pgstore.
var table = benchkit.Table{
	Columns: [2]string{"pgstore", "raw ceiling"},
	Fields:  [2]string{"pgstore", "raw"},
	Figures: []benchkit.Figure{
		{Key: "write_fresh_feed", Title: "write, fresh keys, feed on", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.85", MinRatio: 0.85},
		{Key: "write_update_feed", Title: "write, updates, feed on", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.85", MinRatio: 0.85},
		{Key: "write_fresh_nofeed", Title: "write, fresh keys, feed off", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.85", MinRatio: 0.85},
		{Key: "write_update_nofeed", Title: "write, updates, feed off", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.85", MinRatio: 0.85},
		{Key: "write_fresh_log", Title: "write, fresh keys, change log", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.85", MinRatio: 0.85},
		{Key: "write_update_log", Title: "write, updates, change log", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.85", MinRatio: 0.85},
		{Key: "write_concurrent", Title: "write, concurrent Set", Unit: "rec/s", Kind: throughput, Target: "none"},
		{Key: "get_p50", Title: "Get latency p50", Unit: "µs", Kind: latency, Target: "ratio ≥ 0.8", MinRatio: 0.8},
		{Key: "get_p99", Title: "Get latency p99", Unit: "µs", Kind: latency, Target: "none"},
		{Key: "get_concurrent", Title: "Get, concurrent", Unit: "get/s", Kind: throughput, Target: "none"},
		{Key: "change_p50", Title: "change latency p50", Unit: "µs", Kind: latency, Target: "ratio ≥ 0.5", MinRatio: 0.5},
		{Key: "change_p99", Title: "change latency p99", Unit: "µs", Kind: latency, Target: "none"},
		{Key: "change_log_p50", Title: "change latency p50, change log", Unit: "µs", Kind: latency, Target: "ratio ≥ 0.5", MinRatio: 0.5},
		{Key: "change_log_p99", Title: "change latency p99, change log", Unit: "µs", Kind: latency, Target: "none"},
		{Key: "replay", Title: "replay, subscription far behind the log", Unit: "ev/s", Kind: throughput, Target: "ratio ≥ 0.8", MinRatio: 0.8},
		{Key: "fanout", Title: "write, 16 subscribers / 1, change log", Unit: "rec/s", Kind: throughput, Target: "ratio ≥ 0.9", MinRatio: 0.9},
		{Key: "fanout_raw", Title: "write, 16 subscribers, pgstore / raw readers", Unit: "rec/s", Kind: throughput, Target: "none"},
		{Key: "peak_heap_mb", Title: "peak heap, SetAsync run", Unit: "MB", Kind: latency, Target: fmt.Sprintf("< %d MB", heapTargetMB), MinRatio: 1, CeilingText: "(target)"},
		{Key: "stuck_set_p50", Title: "Set p50 behind an open snapshot, last/first", Unit: "µs", Kind: latency, Target: "none"},
	},
}

func printReport(w io.Writer, rep *benchkit.Report, s settings) {
	mode := "full"
	if s.quick {
		mode = "quick"
	}
	fmt.Fprintf(w, "\npgstore benchmark (%s run): PostgreSQL %s, GOMAXPROCS %d, %d-byte values, throughputs best of %d round(s)\n\n",
		mode, rep.Server, runtime.GOMAXPROCS(0), s.valueBytes, s.rounds)
	rep.Write(w)
}
