package mapbroker

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// newSchema names a schema of the test's own, dropped when it ends.
func newSchema(t testing.TB) string {
	t.Helper()
	return pgtest.SchemaWithPrefix(t, "mapbroker_test_")
}

// channelOptions are the map options of the tests' channels, by name
// prefix: "rec…" recoverable with a one-second KeyTTL, "eph…" ephemeral,
// "small…" a stream of 3, "short…" a StreamTTL of 300ms, "big…" a stream
// of a million, "meta…" a MetaTTL of 600ms; every other is persistent
// with centrifuge's defaults.
func channelOptions(ch string) centrifuge.MapChannelOptions {
	switch {
	case len(ch) >= 3 && ch[:3] == "rec":
		return centrifuge.MapChannelOptions{Mode: centrifuge.MapModeRecoverable, KeyTTL: time.Second}
	case len(ch) >= 3 && ch[:3] == "eph":
		return centrifuge.MapChannelOptions{Mode: centrifuge.MapModeEphemeral, KeyTTL: time.Second}
	case len(ch) >= 5 && ch[:5] == "small":
		return centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent, StreamSize: 3}
	case len(ch) >= 5 && ch[:5] == "short":
		return centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent, StreamTTL: 300 * time.Millisecond}
	case len(ch) >= 3 && ch[:3] == "big":
		return centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent, StreamSize: 1 << 20}
	case len(ch) >= 4 && ch[:4] == "meta":
		return centrifuge.MapChannelOptions{Mode: centrifuge.MapModeRecoverable, KeyTTL: 300 * time.Millisecond,
			StreamTTL: 300 * time.Millisecond, MetaTTL: 600 * time.Millisecond}
	}
	return centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent}
}

func newNode(t testing.TB) *centrifuge.Node {
	t.Helper()
	node, err := centrifuge.New(centrifuge.Config{Map: centrifuge.MapConfig{GetMapChannelOptions: channelOptions}})
	require.NoError(t, err)
	return node
}

// A recorder is a node's BrokerEventHandler that keeps what it receives.
type recorder struct {
	mu     sync.Mutex
	got    []delivered
	notify chan struct{}
}

type delivered struct {
	ch    string
	pub   *centrifuge.Publication
	sp    centrifuge.StreamPosition
	delta bool
	prev  *centrifuge.Publication
}

func newRecorder() *recorder { return &recorder{notify: make(chan struct{}, 1)} }

func (r *recorder) HandlePublication(ch string, pub *centrifuge.Publication, sp centrifuge.StreamPosition, delta bool, prev *centrifuge.Publication) error {
	r.mu.Lock()
	r.got = append(r.got, delivered{ch, pub, sp, delta, prev})
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
	return nil
}

func (r *recorder) HandleJoin(string, *centrifuge.ClientInfo) error  { return nil }
func (r *recorder) HandleLeave(string, *centrifuge.ClientInfo) error { return nil }

// of returns what the recorder received for a channel.
func (r *recorder) of(ch string) []delivered {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []delivered
	for _, d := range r.got {
		if d.ch == ch {
			out = append(out, d)
		}
	}
	return out
}

// wait waits until the recorder holds n deliveries of ch.
func (r *recorder) wait(t testing.TB, ch string, n int) []delivered {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		if got := r.of(ch); len(got) >= n {
			return got
		}
		select {
		case <-r.notify:
		case <-deadline.C:
			t.Fatalf("channel %s: %d deliveries after 10s, want %d", ch, len(r.of(ch)), n)
		}
	}
}

// A node is one server node of a test: a pgstore connector on the test's
// schema and a broker on it.
type node struct {
	broker *Broker
	store  *pgstore.Connector
	pool   *pgxpool.Pool
	rec    *recorder
}

// newStore opens a pool and a pgstore connector on it, on schema, with the
// change log on; both close when the test ends.
func newStore(t testing.TB, schema string, opts ...pgstore.Option) (*pgstore.Connector, *pgxpool.Pool) {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, pgtest.URL(t))
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	opts = append([]pgstore.Option{pgstore.WithSchema(schema), pgstore.WithChangeLog(time.Minute), pgstore.WithLogger(quietLogger())}, opts...)
	store, err := pgstore.New(ctx, pool, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, store.Close(context.Background())) })
	return store, pool
}

// newPgNode starts a broker on a pool and connector of its own, on schema,
// sharing the pool as an application would.
func newPgNode(t testing.TB, schema string, opts ...pgstore.Option) *node {
	t.Helper()
	store, pool := newStore(t, schema, opts...)
	b, err := New(newNode(t), Config{Store: store, Pool: pool, ExpireInterval: 50 * time.Millisecond, Logger: quietLogger()})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, b.Close(context.Background())) })
	rec := newRecorder()
	require.NoError(t, b.RegisterEventHandler(rec))
	return &node{broker: b, store: store, pool: pool, rec: rec}
}

func quietLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.Default()
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// A subject is a broker under test, and how it delivers.
type subject struct {
	broker centrifuge.MapBroker
	rec    *recorder
	// subscribe makes the broker deliver a channel's publications to rec.
	subscribe func(t testing.TB, ch string)
}

// brokers are the brokers every contract test runs against: pgstore's and
// centrifuge's own memory broker, the reference.
var brokers = []struct {
	name  string
	start func(t testing.TB) subject
}{
	{"pgstore", func(t testing.TB) subject {
		n := newPgNode(t, newSchema(t))
		return subject{broker: n.broker, rec: n.rec, subscribe: func(t testing.TB, ch string) {
			require.NoError(t, n.broker.Subscribe(ch))
		}}
	}},
	{"memory", func(t testing.TB) subject {
		mb, err := centrifuge.NewMemoryMapBroker(newNode(t), centrifuge.MemoryMapBrokerConfig{})
		require.NoError(t, err)
		rec := newRecorder()
		require.NoError(t, mb.RegisterEventHandler(rec))
		t.Cleanup(func() { _ = mb.Close(context.Background()) })
		return subject{broker: mb, rec: rec, subscribe: func(testing.TB, string) {}}
	}},
}

// forEachBroker runs a contract test against every broker.
func forEachBroker(t *testing.T, test func(t *testing.T, s subject)) {
	for _, b := range brokers {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			test(t, b.start(t))
		})
	}
}

// pgOnly runs a test that holds for pgstore's broker only.
func pgOnly(t *testing.T) *node {
	t.Helper()
	t.Parallel()
	return newPgNode(t, newSchema(t))
}

func publish(t testing.TB, b centrifuge.MapBroker, ch, key, data string, mods ...func(*centrifuge.MapPublishOptions)) centrifuge.MapUpdateResult {
	t.Helper()
	opts := centrifuge.MapPublishOptions{Data: []byte(data)}
	for _, m := range mods {
		m(&opts)
	}
	res, err := b.Publish(context.Background(), ch, key, opts)
	require.NoError(t, err)
	return res
}

func readAll(t testing.TB, b centrifuge.MapBroker, ch string) ([]*centrifuge.Publication, centrifuge.StreamPosition) {
	t.Helper()
	res, err := b.ReadState(context.Background(), ch, centrifuge.MapReadStateOptions{Limit: -1})
	require.NoError(t, err)
	return res.Publications, res.Position
}

func readStream(t testing.TB, b centrifuge.MapBroker, ch string, f centrifuge.StreamFilter) centrifuge.MapStreamResult {
	t.Helper()
	res, err := b.ReadStream(context.Background(), ch, centrifuge.MapReadStreamOptions{Filter: f})
	require.NoError(t, err)
	return res
}

// offsets returns the offsets of publications.
func offsets(pubs []*centrifuge.Publication) []uint64 {
	out := make([]uint64, len(pubs))
	for i, p := range pubs {
		out[i] = p.Offset
	}
	return out
}

// keysData returns "key=data" of publications ("key-" for a removal).
func keysData(pubs []*centrifuge.Publication) []string {
	out := make([]string, len(pubs))
	for i, p := range pubs {
		if p.Removed {
			out[i] = p.Key + "-"
		} else {
			out[i] = p.Key + "=" + string(p.Data)
		}
	}
	return out
}
