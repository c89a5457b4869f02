// Command bench measures the pgstore map broker (package mapbroker) against
// what bounds it: centrifuge's memory map broker, the same work without a
// database, and pgstore's own Set, the same durable write without the
// broker:
//
//	cd examples/centrifuge
//	go run ./bench            # full run, about 30 s
//	go run ./bench -quick     # under 60 s
//
// It measures the publish throughput of 8 concurrent publishers (distinct
// keys of one channel) and the latency from a Publish call to the node's
// BrokerEventHandler, the two sides taking turns in one run. It works in
// fresh schemas that it drops when it ends, also on an error or Ctrl-C. It
// prints a table (figure, pgstore broker, ceiling, ratio, target) and, as
// its last line, one JSON object with the broker's value, the ceiling's and
// their ratio for each figure: broker/ceiling for throughputs,
// ceiling/broker for latencies, so that higher is better. Progress goes to
// stderr.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/examples/centrifuge/mapbroker"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// retention is the change log's: far longer than a run.
const retention = time.Hour

type settings struct {
	url          string
	quick        bool
	publications int // per side and round of the throughput figures
	samples      int // latency samples per side
	goroutines   int
	rounds       int
	valueBytes   int
}

func parseFlags(args []string) (settings, error) {
	var s settings
	fs := benchkit.NewFlags("bench", &s.url, &s.quick, "small sizes and one round: finishes in under 60 s")
	fs.Sized(&s.publications, "publications", 5_000, 3_000, "publications per side and round of the throughput figures (default 5000, -quick 3000)")
	fs.Sized(&s.samples, "samples", 1_000, 500, "latency samples per side (default 1000, -quick 500)")
	fs.Positive(&s.goroutines, "goroutines", 8, "concurrent publishers of the throughput figures")
	fs.Sized(&s.rounds, "rounds", 3, 1, "rounds of each throughput figure, best kept (default 3, -quick 1)")
	fs.ValueBytes(&s.valueBytes, "size of each publication's JSON data")
	err := fs.Parse(args)
	return s, err
}

func main() {
	os.Exit(benchkit.Main("bench", os.Args[1:], parseFlags, run))
}

func run(ctx context.Context, s settings) error {
	rep := table.NewReport()
	err := measure(ctx, s, rep)
	printReport(os.Stdout, rep, s)
	return err
}

// env is what every figure works with.
type env struct {
	s   settings
	rep *benchkit.Report
	raw *pgxpool.Pool // setup and checks
	// brokerSchema holds the pgstore broker's channels, setSchema the
	// tables of the Set reference: a change log (and its lock) each.
	brokerSchema, setSchema string
}

func measure(ctx context.Context, s settings, rep *benchkit.Report) error {
	raw, server, err := benchkit.Open(ctx, s.url)
	if err != nil {
		return err
	}
	defer raw.Close()
	rep.Server = server
	name := benchkit.SchemaName("pgstore_cfbench_")
	e := &env{s: s, rep: rep, raw: raw, brokerSchema: name + "_broker", setSchema: name + "_set"}
	defer benchkit.DropSchemas(raw, "bench", e.brokerSchema, e.setSchema)

	return benchkit.RunSteps(ctx, e, []benchkit.Step[*env]{
		{Name: "publish", Run: publishFigures},
		{Name: "latency", Run: latencyFigures},
	}, progress)
}

// channelOptions are every channel's: persistent, with the command's default
// stream, for both brokers.
func channelOptions(string) centrifuge.MapChannelOptions {
	return centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent, StreamSize: 10_000, StreamTTL: 10 * time.Minute}
}

func newNode() (*centrifuge.Node, error) {
	return centrifuge.New(centrifuge.Config{Map: centrifuge.MapConfig{GetMapChannelOptions: channelOptions}})
}

// A store is a pgstore connector with the change log on, on a pool of its
// own large enough for every publisher.
type store struct {
	*pgstore.Connector
	pool *pgxpool.Pool
}

func (e *env) connect(ctx context.Context, schema string) (*store, error) {
	cfg, err := pgxpool.ParseConfig(e.s.url)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = max(cfg.MaxConns, int32(e.s.goroutines+4))
	s := &store{}
	if s.pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
		return nil, err
	}
	s.Connector, err = pgstore.New(ctx, s.pool, pgstore.WithSchema(schema), pgstore.WithChangeLog(retention))
	if err != nil {
		s.pool.Close()
		return nil, err
	}
	return s, nil
}

// close closes the connector and its pool, also after the run's context
// ended.
func (s *store) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bench: close connector:", err)
	}
	s.pool.Close()
}

// A pgNode is a centrifuge node's pgstore broker, on a store of its own,
// delivering to a handler of the benchmark's.
type pgNode struct {
	store   *store
	broker  *mapbroker.Broker
	handler *handler
}

// openPgNode opens a node whose handler watches channel watched, and
// subscribes it to watched and channels.
func (e *env) openPgNode(ctx context.Context, watched string, channels ...string) (*pgNode, error) {
	st, err := e.connect(ctx, e.brokerSchema)
	if err != nil {
		return nil, err
	}
	node, err := newNode()
	if err != nil {
		st.close()
		return nil, err
	}
	// The broker logs what it cannot return (failed deliveries): to stderr.
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	b, err := mapbroker.New(node, mapbroker.Config{Store: st.Connector, Pool: st.pool, Logger: logger})
	if err != nil {
		st.close()
		return nil, err
	}
	n := &pgNode{store: st, broker: b, handler: newHandler(watched)}
	if err := b.RegisterEventHandler(n.handler); err != nil {
		n.close()
		return nil, err
	}
	if err := b.Subscribe(append([]string{watched}, channels...)...); err != nil {
		n.close()
		return nil, err
	}
	return n, nil
}

func (n *pgNode) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.broker.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bench: close broker:", err)
	}
	n.store.close()
}

// openMemoryBroker is centrifuge's memory map broker on a node of its own.
func openMemoryBroker(watched string) (*centrifuge.MemoryMapBroker, *handler, error) {
	node, err := newNode()
	if err != nil {
		return nil, nil, err
	}
	b, err := centrifuge.NewMemoryMapBroker(node, centrifuge.MemoryMapBrokerConfig{})
	if err != nil {
		return nil, nil, err
	}
	h := newHandler(watched)
	if err := b.RegisterEventHandler(h); err != nil {
		return nil, nil, err
	}
	return b, h, nil
}

// progress reports what the run is doing, on stderr.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func ident(schema, table string) string { return pgx.Identifier{schema, table}.Sanitize() }
