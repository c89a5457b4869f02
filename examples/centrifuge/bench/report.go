package main

import (
	"fmt"
	"io"
	"runtime"

	"github.com/pgstore/pgstore/internal/benchkit"
)

const (
	throughput = benchkit.Throughput // higher is better: ratio = broker/ceiling
	latency    = benchkit.Latency    // lower is better: ratio = ceiling/broker
)

// table lays out the figures of the table and of the JSON line, in their
// order. A figure of the ceiling alone (a part of another's) has no broker
// value and no ratio.
var table = benchkit.Table{
	Columns:          [2]string{"pgstore broker", "ceiling"},
	Fields:           [2]string{"broker", "ceiling"},
	WholeLatencyFrom: 100,
	Figures: []benchkit.Figure{
		{Key: "publish", Title: "publish, 8 publishers / pgstore concurrent Set", Unit: "pub/s", Kind: throughput, Target: "ratio ≥ 0.5", MinRatio: 0.5},
		{Key: "publish_memory", Title: "publish, 8 publishers / memory broker", Unit: "pub/s", Kind: throughput, Target: "none"},
		{Key: "latency_p50", Title: "publish → handler p50 / 2×(Set→handler + memory)", Unit: "µs", Kind: latency, Target: "ratio ≥ 1", MinRatio: 1},
		{Key: "latency_p99", Title: "publish → handler p99 / 2×(Set→handler + memory)", Unit: "µs", Kind: latency, Target: "none"},
		{Key: "latency_other_node_p50", Title: "publish → other node's handler p50 / 2×(Set→handler + memory)", Unit: "µs", Kind: latency, Target: "ratio ≥ 1", MinRatio: 1},
		{Key: "latency_other_node_p99", Title: "publish → other node's handler p99 / 2×(Set→handler + memory)", Unit: "µs", Kind: latency, Target: "none"},
		{Key: "set_latency_p50", Title: "  of which: pgstore Set → handler on another connector, p50", Unit: "µs", Kind: latency},
		{Key: "set_latency_p99", Title: "  of which: pgstore Set → handler on another connector, p99", Unit: "µs", Kind: latency},
		{Key: "memory_latency_p50", Title: "  of which: memory broker publish → handler, p50", Unit: "µs", Kind: latency},
		{Key: "memory_latency_p99", Title: "  of which: memory broker publish → handler, p99", Unit: "µs", Kind: latency},
	},
}

func printReport(w io.Writer, rep *benchkit.Report, s settings) {
	mode := "full"
	if s.quick {
		mode = "quick"
	}
	fmt.Fprintf(w, "\npgstore map broker benchmark (%s run): PostgreSQL %s, GOMAXPROCS %d, %d-byte data, %d publishers, throughputs best of %d round(s)\n\n",
		mode, rep.Server, runtime.GOMAXPROCS(0), s.valueBytes, s.goroutines, s.rounds)
	rep.Write(w)
}
