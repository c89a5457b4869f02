package mapbroker

import (
	"context"
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// The tests of this file are of what pgstore's broker does where the memory
// broker has nothing to compare with, or does otherwise on purpose.

func TestWhatPgstoreCannotHonourIsRefused(t *testing.T) {
	n := pgOnly(t)
	ctx := context.Background()
	_, err := n.broker.Publish(ctx, "eph-cursors", "k", centrifuge.MapPublishOptions{Data: []byte("x")})
	assert.ErrorIs(t, err, ErrUnsupported)
	assert.ErrorContains(t, err, "MapModeEphemeral")
	_, err = n.broker.ReadState(ctx, "eph-cursors", centrifuge.MapReadStateOptions{Limit: -1})
	assert.ErrorIs(t, err, ErrUnsupported)
	_, err = n.broker.ReadStream(ctx, "eph-cursors", centrifuge.MapReadStreamOptions{})
	assert.ErrorIs(t, err, ErrUnsupported)
	_, err = n.broker.Remove(ctx, "eph-cursors", "k", centrifuge.MapRemoveOptions{})
	assert.ErrorIs(t, err, ErrUnsupported)
	_, err = n.broker.Publish(ctx, "cars", "k", centrifuge.MapPublishOptions{KeyMode: "if_whatever"})
	assert.ErrorIs(t, err, ErrUnsupported)
}

func TestChannelsAndKeysPgstoreCannotStoreAreRefused(t *testing.T) {
	n := pgOnly(t)
	ctx := context.Background()
	for _, ch := range []string{"", "a/b", strings.Repeat("c", 64), "nul\x00", "bad\xff"} {
		_, err := n.broker.Publish(ctx, ch, "k", centrifuge.MapPublishOptions{})
		assert.ErrorIs(t, err, ErrInvalidChannel, "channel %q", ch)
		assert.ErrorIs(t, n.broker.Subscribe(ch), ErrInvalidChannel, "channel %q", ch)
	}
	for _, key := range []string{"", "nul\x00", "bad\xff", strings.Repeat("k", pgstore.MaxIDBytes+1), sentinelID} {
		_, err := n.broker.Publish(ctx, "cars", key, centrifuge.MapPublishOptions{})
		assert.ErrorIs(t, err, ErrInvalidKey, "key %q", key)
	}
	_, err := n.broker.Publish(ctx, "cars", "k", centrifuge.MapPublishOptions{Tags: map[string]string{"t": "nul\x00"}})
	assert.ErrorIs(t, err, ErrInvalidValue)
	_, err = n.broker.Publish(ctx, "cars", "k", centrifuge.MapPublishOptions{ClientInfo: &centrifuge.ClientInfo{UserID: "bad\xff"}})
	assert.ErrorIs(t, err, ErrInvalidValue)
	// Names that need quoting are fine.
	for _, ch := range []string{`it's "quoted"; DROP TABLE x`, "Ünïcode", strings.Repeat("c", 63)} {
		res := publish(t, n.broker, ch, `k'"; --`, "v")
		assert.Equal(t, uint64(1), res.Position.Offset, "channel %q", ch)
	}
	stats, err := n.broker.Stats(ctx, "nothing here")
	require.NoError(t, err)
	assert.Equal(t, 0, stats.NumKeys)
}

func TestSinceOlderThanTheStreamIsUnrecoverableNotPartial(t *testing.T) {
	// The memory broker returns what it still holds from such a position,
	// which hides the entries it dropped; this broker refuses instead.
	n := pgOnly(t)
	var epoch string
	for range 5 {
		epoch = publish(t, n.broker, "small", "k", "v").Position.Epoch
	}
	_, err := n.broker.ReadStream(context.Background(), "small", centrifuge.MapReadStreamOptions{
		Filter: centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Offset: 1, Epoch: epoch}, Limit: -1}})
	assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition, "StreamSize 3: entry 2 is gone")
	res := readStream(t, n.broker, "small", centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Offset: 2, Epoch: epoch}, Limit: -1})
	assert.Equal(t, []uint64{3, 4, 5}, offsets(res.Publications))
}

func TestStreamExpiresStreamTTLAfterItsLastEntry(t *testing.T) {
	n := pgOnly(t)
	first := publish(t, n.broker, "short", "a", "1")
	publish(t, n.broker, "short", "b", "2")
	res := readStream(t, n.broker, "short", centrifuge.StreamFilter{Since: &first.Position, Limit: -1})
	assert.Equal(t, []uint64{2}, offsets(res.Publications))
	time.Sleep(400 * time.Millisecond) // StreamTTL is 300ms: waiting for time itself
	_, err := n.broker.ReadStream(context.Background(), "short", centrifuge.MapReadStreamOptions{
		Filter: centrifuge.StreamFilter{Since: &first.Position, Limit: -1}})
	assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
	res = readStream(t, n.broker, "short", centrifuge.StreamFilter{Limit: -1})
	assert.Empty(t, res.Publications)
	assert.Equal(t, uint64(2), res.Position.Offset, "the position outlives the entries")
	res = readStream(t, n.broker, "short", centrifuge.StreamFilter{Since: &res.Position, Limit: -1})
	assert.Empty(t, res.Publications, "a reader at the end is still at the end")
	again := publish(t, n.broker, "short", "c", "3")
	assert.Equal(t, uint64(3), again.Position.Offset)
	assert.Equal(t, first.Position.Epoch, again.Position.Epoch)
}

func TestSinceOlderThanTheLogsRetentionIsUnrecoverable(t *testing.T) {
	n := pgOnly(t)
	ctx := context.Background()
	first := publish(t, n.broker, "cars", "a", "1")
	last := publish(t, n.broker, "cars", "b", "2")
	// What pgstore's retention does when it rotates the log past every
	// entry: the floors of the log's end and of the tables' offsets rise to
	// the last entries, the partitions are emptied, and the head records the
	// last position dropped.
	schema := n.store.Schema()
	head, entries, floors := pgx.Identifier{schema, logHead}.Sanitize(), pgx.Identifier{schema, logEntries}.Sanitize(), pgx.Identifier{schema, logOffsets}.Sanitize()
	for _, stmt := range []string{
		"UPDATE " + head + " SET position = greatest(position, (SELECT max(position) FROM " + entries + "))",
		"INSERT INTO " + floors + " AS f SELECT tbl, max(off) FROM " + entries + " GROUP BY tbl ON CONFLICT (tbl) DO UPDATE SET off = greatest(f.off, excluded.off)",
		"TRUNCATE " + entries,
		"UPDATE " + head + " SET dropped = position",
	} {
		_, err := n.pool.Exec(ctx, stmt)
		require.NoError(t, err, stmt)
	}

	_, err := n.broker.ReadStream(ctx, "cars", centrifuge.MapReadStreamOptions{
		Filter: centrifuge.StreamFilter{Since: &first.Position, Limit: -1}})
	assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
	res := readStream(t, n.broker, "cars", centrifuge.StreamFilter{Since: &last.Position, Limit: -1})
	assert.Empty(t, res.Publications)
	res = readStream(t, n.broker, "cars", centrifuge.StreamFilter{Limit: -1})
	assert.Empty(t, res.Publications, "the stream holds nothing the log lost")
	pubs, pos := readAll(t, n.broker, "cars")
	assert.Len(t, pubs, 2, "the state does not depend on the log")
	assert.Equal(t, last.Position, pos)
	next := publish(t, n.broker, "cars", "c", "3")
	res = readStream(t, n.broker, "cars", centrifuge.StreamFilter{Since: &last.Position, Limit: -1})
	assert.Equal(t, []uint64{next.Position.Offset}, offsets(res.Publications))
}

func TestNewNeedsTheChangeLog(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, pgtest.URL(t))
	require.NoError(t, err)
	defer pool.Close()
	store, err := pgstore.New(ctx, pool, pgstore.WithSchema(schema), pgstore.WithLogger(quietLogger()), pgstore.WithoutChangeLog())
	require.NoError(t, err)
	defer store.Close(ctx)
	_, err = New(newNode(t), Config{Store: store, Pool: pool})
	assert.ErrorIs(t, err, ErrUnsupported)
	assert.ErrorContains(t, err, "WithChangeLog")
	_, err = New(newNode(t), Config{Store: store})
	assert.ErrorContains(t, err, "Config.Pool")
	_, err = New(newNode(t), Config{Pool: pool})
	assert.ErrorContains(t, err, "Config.Store")
}

func TestRowEventsSwitchedOffAreReportedNotIgnored(t *testing.T) {
	t.Parallel()
	n := newPgNode(t, newSchema(t), pgstore.WithEvents(pgstore.CreateTable, pgstore.DestroyTable))
	_, err := n.broker.Publish(context.Background(), "cars", "k", centrifuge.MapPublishOptions{Data: []byte("v")})
	require.Error(t, err)
	assert.ErrorContains(t, err, "WithEvents")
	stats, err := n.broker.Stats(context.Background(), "cars")
	require.NoError(t, err)
	assert.Equal(t, 0, stats.NumKeys, "the change that the log would not record was rolled back")
}

func TestRecordsWrittenWithPgstoreDirectlyAreEntries(t *testing.T) {
	n := pgOnly(t)
	ctx := context.Background()
	require.NoError(t, n.broker.Subscribe("plain"))
	require.NoError(t, n.store.Set(ctx, "plain/early", 7, map[string]int{"a": 1}))
	pubs, pos := readAll(t, n.broker, "plain")
	require.Len(t, pubs, 1)
	assert.JSONEq(t, `{"a":1}`, string(pubs[0].Data), "a record's Data is its JSON")
	assert.Equal(t, uint64(0), pos.Offset, "written before the channel's life began")

	res := publish(t, n.broker, "plain", "mine", "x")
	assert.Equal(t, uint64(1), res.Position.Offset)
	require.NoError(t, n.store.Set(ctx, "plain/late", 1, map[string]int{"b": 2}))
	got := n.rec.wait(t, "plain", 2)
	assert.Equal(t, centrifuge.StreamPosition{Offset: 2, Epoch: res.Position.Epoch}, got[1].sp, "a write through pgstore takes the next offset")
	assert.JSONEq(t, `{"b":2}`, string(got[1].pub.Data))
	// The broker's index has no row for it: a read across it is refused
	// rather than holed.
	_, err := n.broker.ReadStream(ctx, "plain", centrifuge.MapReadStreamOptions{
		Filter: centrifuge.StreamFilter{Since: &res.Position, Limit: -1}})
	assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
	next := publish(t, n.broker, "plain", "mine", "y")
	assert.Equal(t, uint64(3), next.Position.Offset)
}

func TestEnvelopeIsReadableInSQL(t *testing.T) {
	n := pgOnly(t)
	publish(t, n.broker, "docs", "json", `{"title": "x"}`)
	publish(t, n.broker, "docs", "proto", "\x08\x96\x01")
	rows, err := n.pool.Query(context.Background(), "SELECT id, version, val FROM "+pgx.Identifier{n.store.Schema(), "docs"}.Sanitize()+" ORDER BY id")
	require.NoError(t, err)
	type rec struct {
		ID      string
		Version int64
		Val     map[string]any
	}
	recs, err := pgx.CollectRows(rows, pgx.RowToStructByPos[rec])
	require.NoError(t, err)
	require.Len(t, recs, 2)
	assert.Equal(t, `{"title": "x"}`, recs[0].Val["data"], "text payloads are kept as text")
	assert.Equal(t, int64(1), recs[0].Version, "a record's version is the stream offset of its last change")
	assert.Equal(t, "CJYB", recs[1].Val["data_b64"], "binary payloads in base64")
	assert.Nil(t, recs[1].Val["data"])
	var title string
	require.NoError(t, n.pool.QueryRow(context.Background(),
		"SELECT (val->>'data')::jsonb->>'title' FROM "+pgx.Identifier{n.store.Schema(), "docs"}.Sanitize()+" WHERE id = 'json'").Scan(&title))
	assert.Equal(t, "x", title)
	_, err = json.Marshal(recs)
	require.NoError(t, err)
}

// A process that ended while it made a channel's table leaves the table
// without a life, and the sentinel record in it; the next change starts the
// life and removes the sentinel, which no read ever shows.
func TestATableLeftWithoutALifeIsTakenOver(t *testing.T) {
	n := pgOnly(t)
	ctx := context.Background()
	require.NoError(t, n.store.Set(ctx, "orphan/"+sentinelID, 0, sentinelValue))
	pubs, _ := readAll(t, n.broker, "orphan")
	assert.Empty(t, pubs)
	res := publish(t, n.broker, "orphan", "k", "v")
	assert.Equal(t, uint64(1), res.Position.Offset)
	pubs, pos := readAll(t, n.broker, "orphan")
	assert.Equal(t, []string{"k=v"}, keysData(pubs))
	assert.Equal(t, res.Position, pos)
	stats, err := n.broker.Stats(ctx, "orphan")
	require.NoError(t, err)
	assert.Equal(t, 1, stats.NumKeys)
}

// commitCanceller cancels a context when a batch that ends in COMMIT is
// sent, once armed.
type commitCanceller struct {
	armed  atomic.Bool
	cancel atomic.Pointer[context.CancelFunc]
}

func (c *commitCanceller) TraceBatchStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchStartData) context.Context {
	qs := data.Batch.QueuedQueries
	if len(qs) > 0 && qs[len(qs)-1].SQL == "COMMIT" && c.armed.CompareAndSwap(true, false) {
		(*c.cancel.Load())()
	}
	return ctx
}
func (c *commitCanceller) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (c *commitCanceller) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}
func (c *commitCanceller) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}
func (c *commitCanceller) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// A caller that gives up as a change's COMMIT is sent does not cut it short:
// cut short, a change whose COMMIT was on its way could still commit, after
// Publish returned an error, and reads made in between would miss it.
func TestACommitIsNotCutShortByTheCaller(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	tracer := &commitCanceller{}
	cfg.ConnConfig.Tracer = tracer
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	store, err := pgstore.New(context.Background(), pool, pgstore.WithSchema(schema), pgstore.WithChangeLog(time.Minute), pgstore.WithLogger(quietLogger()))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, store.Close(context.Background())) })
	b, err := New(newNode(t), Config{Store: store, Pool: pool, Logger: quietLogger()})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, b.Close(context.Background())) })
	publish(t, b, "cars", "first", "1") // the channel's table is made

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tracer.cancel.Store(&cancel)
	tracer.armed.Store(true)
	res, err := b.Publish(ctx, "cars", "k", centrifuge.MapPublishOptions{Data: []byte("v")})
	require.NoError(t, err)
	require.False(t, tracer.armed.Load(), "the COMMIT was sent with the context cancelled")
	assert.Equal(t, uint64(2), res.Position.Offset)
	pubs, _ := readAll(t, b, "cars")
	assert.Equal(t, []string{"first=1", "k=v"}, keysData(pubs))
}

// A channel's KeyTTL and MetaTTL are the options of the node that writes
// last: published again through a node whose channel has neither, a key no
// longer expires and the channel's metadata no longer does.
func TestTheLastWritersTTLsHold(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	ctx := context.Background()
	var pool *pgxpool.Pool
	nodeWith := func(opts centrifuge.MapChannelOptions) *Broker {
		node, err := centrifuge.New(centrifuge.Config{Map: centrifuge.MapConfig{
			GetMapChannelOptions: func(string) centrifuge.MapChannelOptions { return opts }}})
		require.NoError(t, err)
		var store *pgstore.Connector
		store, pool = newStore(t, schema)
		b, err := New(node, Config{Store: store, Pool: pool, Logger: quietLogger()})
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, b.Close(context.Background())) })
		return b
	}
	expiring := nodeWith(centrifuge.MapChannelOptions{Mode: centrifuge.MapModeRecoverable, KeyTTL: time.Hour, MetaTTL: time.Hour})
	lasting := nodeWith(centrifuge.MapChannelOptions{Mode: centrifuge.MapModePersistent})
	count := func(sql string) int {
		var n int
		require.NoError(t, pool.QueryRow(ctx, sql, "room").Scan(&n))
		return n
	}
	expiries := "SELECT count(*) FROM " + pgx.Identifier{schema, expiryTable}.Sanitize() + " WHERE tbl = $1"
	metaTTLs := "SELECT count(*) FROM " + pgx.Identifier{schema, epochsTable}.Sanitize() + " WHERE tbl = $1 AND meta_expires IS NOT NULL"

	publish(t, expiring, "room", "k", "v1")
	publish(t, expiring, "room", "j", "v1")
	require.Equal(t, 2, count(expiries))
	require.Equal(t, 1, count(metaTTLs))

	publish(t, lasting, "room", "k", "v2")
	assert.Equal(t, 1, count(expiries), "k no longer expires; j still does")
	assert.Equal(t, 0, count(metaTTLs), "the channel's metadata no longer expires")
	publish(t, lasting, "room", "j", "v2")
	publish(t, lasting, "room", "new", "v1")
	assert.Equal(t, 0, count(expiries))
	pubs, _ := readAll(t, lasting, "room")
	assert.Equal(t, []string{"j=v2", "k=v2", "new=v1"}, keysData(pubs))
}

// A change's transaction takes the generic plans of its statements, which the
// plan cache would not choose for the stream write, and only that
// transaction does: the connection plans as before once it ends.
func TestAChangeTakesGenericPlansForItsTransactionOnly(t *testing.T) {
	n := pgOnly(t)
	ctx := context.Background()
	publish(t, n.broker, "cars", "k", "v") // the channel and the log exist
	conn, err := n.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	show := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) string {
		var mode string
		require.NoError(t, q.QueryRow(ctx, "SHOW plan_cache_mode").Scan(&mode))
		return mode
	}
	before := show(conn)
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	var locked bool
	require.NoError(t, tx.QueryRow(ctx, n.broker.sql.lockHead, lockClass, n.broker.lockKey("cars"), n.broker.sql.schema).Scan(&locked))
	require.True(t, locked)
	assert.Equal(t, "force_generic_plan", show(tx))
	require.NoError(t, tx.Commit(ctx))
	assert.Equal(t, before, show(conn))
}
