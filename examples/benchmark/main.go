// Command benchmark measures pgstore against the best raw pgx technique doing
// the same work, the ceiling pgstore can approach:
//
//	go run ./examples/benchmark            # full run, a few minutes
//	go run ./examples/benchmark -quick     # under 45 s
//	go run ./examples/benchmark -cpuprofile cpu.prof -figures write
//
// It works in fresh schemas that it drops when it ends, also on an error or
// Ctrl-C. It prints a table (figure, pgstore, raw ceiling, ratio, target) and,
// as its last line, one JSON object with pgstore's value, the ceiling's value
// and their ratio for each figure: pgstore/raw for throughputs, raw/pgstore
// for latencies, so that 1.0 is parity and higher is better. Progress goes to
// stderr.
//
// The CPU profile labels every sample with the figure and the side
// ("pgstore" or "raw"): go tool pprof -tagfocus side=pgstore cpu.prof.
package main

import (
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// figureGroups are the parts of the run that -figures selects, in run order.
var figureGroups = []figureGroup{
	{Name: "write", Run: writeFigures},
	{Name: "concurrent", Run: concurrentFigure},
	{Name: "get", Run: getFigures},
	{Name: "change", Run: changeFigures},
	{Name: "log", Run: logFigures},
	{Name: "memory", Run: memoryFigure},
	{Name: "stuck", Run: stuckFigure},
}

type figureGroup = benchkit.Step[*env]

type settings struct {
	url        string
	quick      bool
	records    int // figure 1
	concurrent int // records of figure 2
	gets       int
	changes    int
	memRecords int
	// replayEntries is how far behind the log's end the replay figure's
	// subscription starts; fanoutSamples the fanout figure's latency samples.
	replayEntries int
	fanoutSamples int
	// stuckWrites is how many writes the stuck figure makes behind an open
	// snapshot.
	stuckWrites int
	goroutines  int
	rounds      int
	valueBytes  int
	figures     []string
	cpuProfile  string
}

func parseFlags(args []string) (settings, error) {
	var s settings
	fs := benchkit.NewFlags("benchmark", &s.url, &s.quick, "small sizes and one round: finishes in under 45 s")
	fs.Sized(&s.records, "records", 100_000, 20_000, "records written per write figure (default 100000, -quick 20000)")
	// the raw side writes a row per round trip
	fs.Sized(&s.concurrent, "concurrent-records", 20_000, 4_000, "records written by the concurrent Set figure (default 20000, -quick 4000)")
	fs.Sized(&s.gets, "gets", 10_000, 2_000, "Get samples (default 10000, -quick 2000)")
	fs.Sized(&s.changes, "changes", 2_000, 300, "change-latency samples (default 2000, -quick 300)")
	fs.Sized(&s.replayEntries, "replay-entries", 1_000_000, 100_000, "log entries the replay figure's subscription starts behind (default 1000000, -quick 100000)")
	fs.Sized(&s.fanoutSamples, "fanout-samples", 500, 300, "delivery-latency samples of the fanout figure, one every 10 ms (default 500, -quick 300)")
	fs.Sized(&s.memRecords, "mem-records", 1_000_000, 200_000, "records written by the memory figure (default 1000000, -quick 200000)")
	fs.Sized(&s.stuckWrites, "stuck-writes", 20_000, 3_000, "one-row writes the stuck figure makes behind an open snapshot (default 20000, -quick 3000)")
	fs.Positive(&s.goroutines, "goroutines", 8, "goroutines of the concurrent figures")
	fs.Sized(&s.rounds, "rounds", 3, 1, "rounds of each throughput figure, best kept (default 3, -quick 1)")
	fs.ValueBytes(&s.valueBytes, "size of each record's JSON value")
	figures := fs.String("figures", "write,concurrent,get,change,log,memory,stuck", "figures to measure, comma-separated")
	fs.StringVar(&s.cpuProfile, "cpuprofile", "", "write a CPU profile of the run to this file")
	if err := fs.Parse(args); err != nil {
		return s, err
	}
	for _, f := range strings.Split(*figures, ",") {
		f = strings.TrimSpace(f)
		if !slices.ContainsFunc(figureGroups, func(g figureGroup) bool { return g.Name == f }) {
			return s, fmt.Errorf("-figures: unknown figure %q", f)
		}
		s.figures = append(s.figures, f)
	}
	return s, nil
}

func main() {
	os.Exit(benchkit.Main("benchmark", os.Args[1:], parseFlags, run))
}

func run(ctx context.Context, s settings) error {
	if s.cpuProfile != "" {
		f, err := os.Create(s.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	rep := table.NewReport()
	err := measure(ctx, s, rep)
	printReport(os.Stdout, rep, s)
	return err
}

// env is what every figure works with.
type env struct {
	s      settings
	rep    *benchkit.Report
	raw    *pgxpool.Pool // the ceiling's pool, also used for setup and checks
	schema string        // the NOTIFY feed (WithoutChangeLog)
	// noFeed is the schema of the connectors with the change feed off; a
	// schema of its own, so that no connector brings the triggers of the
	// other's tables in line with its own events.
	noFeed string
	// logged is the schema of the connectors with the change log on, as
	// pgstore's default is.
	logged   string
	poolSize int // of raw, pgxpool's default
}

func measure(ctx context.Context, s settings, rep *benchkit.Report) error {
	raw, server, err := benchkit.Open(ctx, s.url)
	if err != nil {
		return err
	}
	defer raw.Close()
	rep.Server = server
	name := benchkit.SchemaName("pgstore_bench_")
	e := &env{s: s, rep: rep, raw: raw, schema: name, noFeed: name + "_nofeed", logged: name + "_log", poolSize: int(raw.Config().MaxConns)}
	defer benchkit.DropSchemas(raw, "benchmark", e.schema, e.noFeed, e.logged)

	var groups []figureGroup
	for _, g := range figureGroups {
		if slices.Contains(s.figures, g.Name) {
			groups = append(groups, g)
		}
	}
	// RunSteps collects garbage after each group: one figure's must not
	// weigh on the next.
	return benchkit.RunSteps(ctx, e, groups, progress)
}

// A store is a connector on a pool of its own, opened as Connect opens one,
// with a tracer that counts the pipelines the connector sends: one a flush.
type store struct {
	*pgstore.Connector
	pool    *pgxpool.Pool
	batches *batchCounter
}

// connect opens a store on schema, with pgstore's defaults unless opts say
// otherwise, but without a change log outside e.logged. Open it inside
// labelled: its background goroutines inherit the labels.
func (e *env) connect(ctx context.Context, schema string, opts ...pgstore.Option) (*store, error) {
	if schema != e.logged {
		opts = append([]pgstore.Option{pgstore.WithoutChangeLog()}, opts...)
	}
	cfg, err := pgxpool.ParseConfig(e.s.url)
	if err != nil {
		return nil, err
	}
	s := &store{batches: &batchCounter{}}
	cfg.ConnConfig.Tracer = s.batches
	if s.pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
		return nil, err
	}
	s.Connector, err = pgstore.New(ctx, s.pool, append([]pgstore.Option{pgstore.WithSchema(schema)}, opts...)...)
	if err != nil {
		s.pool.Close()
		return nil, err
	}
	return s, nil
}

// connectLabelled opens a store inside labelled, so that its background
// goroutines carry the figure's profile labels.
func (e *env) connectLabelled(ctx context.Context, figure, schema string, opts ...pgstore.Option) (*store, error) {
	var c *store
	err := labelled(ctx, figure, "pgstore", func(ctx context.Context) (err error) {
		c, err = e.connect(ctx, schema, opts...)
		return err
	})
	return c, err
}

// close flushes and closes the connector and its pool, also after the
// run's context ended.
func (s *store) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "benchmark: close connector:", err)
	}
	s.pool.Close()
}

// batchCounter is a pgx tracer that counts batches (pipelines).
type batchCounter struct{ n atomic.Int64 }

func (b *batchCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}
func (b *batchCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (b *batchCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	b.n.Add(1)
	return ctx
}
func (b *batchCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (b *batchCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// labelled runs f with profiler labels naming the figure and the side
// (pgstore or raw).
func labelled(ctx context.Context, figure, side string, f func(context.Context) error) error {
	var err error
	pprof.Do(ctx, pprof.Labels("figure", figure, "side", side), func(ctx context.Context) { err = f(ctx) })
	return err
}

// progress reports what the run is doing, on stderr.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func ident(schema, table string) string { return pgx.Identifier{schema, table}.Sanitize() }
