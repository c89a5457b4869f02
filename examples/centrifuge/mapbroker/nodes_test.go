package mapbroker

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Two nodes are two connectors and two brokers on one schema, as two server
// processes would be.
func twoNodes(t *testing.T) (a, b *node) {
	t.Helper()
	t.Parallel()
	schema := newSchema(t)
	return newPgNode(t, schema), newPgNode(t, schema)
}

func TestPublicationsOfOneNodeReachTheOtherInStreamOrder(t *testing.T) {
	a, b := twoNodes(t)
	ctx := context.Background()
	require.NoError(t, b.broker.Subscribe("scores"))
	require.NoError(t, a.broker.Subscribe("scores"))

	var want []centrifuge.StreamPosition
	for i := range 20 {
		res := publish(t, a.broker, "scores", fmt.Sprintf("p%d", i%4), fmt.Sprintf("%d", i),
			func(o *centrifuge.MapPublishOptions) { o.Tags = map[string]string{"i": fmt.Sprint(i)} })
		want = append(want, res.Position)
		publish(t, a.broker, "unwatched", "k", "v") // B does not subscribe to it
	}
	rm, err := a.broker.Remove(ctx, "scores", "p1", centrifuge.MapRemoveOptions{})
	require.NoError(t, err)
	want = append(want, rm.Position)

	for name, n := range map[string]*node{"other node": b, "publishing node": a} {
		got := n.rec.wait(t, "scores", len(want))
		require.Len(t, got, len(want), name)
		for i, d := range got {
			assert.Equal(t, want[i], d.sp, "%s: delivery %d", name, i)
			assert.Equal(t, want[i].Offset, d.pub.Offset, name)
			if i < 20 {
				assert.Equal(t, fmt.Sprintf("p%d", i%4), d.pub.Key, name)
				assert.Equal(t, fmt.Sprint(i), string(d.pub.Data), name)
				assert.Equal(t, fmt.Sprint(i), d.pub.Tags["i"], name)
			}
		}
		last := got[len(got)-1].pub
		assert.True(t, last.Removed, name)
		assert.Equal(t, "p1", last.Key, name)
		assert.Equal(t, map[string]string{"i": "17"}, last.Tags, "%s: a removal carries the removed entry's tags", name)
		assert.Empty(t, n.rec.of("unwatched"), name)
	}

	require.NoError(t, b.broker.Unsubscribe("scores"))
	publish(t, a.broker, "scores", "after", "x")
	a.rec.wait(t, "scores", len(want)+1)
	assert.Len(t, b.rec.of("scores"), len(want), "an unsubscribed node receives nothing more")
}

func TestConcurrentIfNewOnTwoNodesHasOneWinner(t *testing.T) {
	a, b := twoNodes(t)
	var wg sync.WaitGroup
	results := make(chan centrifuge.MapUpdateResult, 16)
	for i := range 16 {
		n := a
		if i%2 == 1 {
			n = b
		}
		wg.Go(func() {
			res, err := n.broker.Publish(context.Background(), "locks", "resource", centrifuge.MapPublishOptions{
				Data: []byte(fmt.Sprint(i)), KeyMode: centrifuge.KeyModeIfNew})
			assert.NoError(t, err)
			results <- res
		})
	}
	wg.Wait()
	close(results)
	winners := 0
	for res := range results {
		if !res.Suppressed {
			winners++
		} else {
			assert.Equal(t, centrifuge.SuppressReasonKeyExists, res.SuppressReason)
		}
	}
	assert.Equal(t, 1, winners)
	stats, err := a.broker.Stats(context.Background(), "locks")
	require.NoError(t, err)
	assert.Equal(t, 1, stats.NumKeys)
}

func TestConcurrentChangesOnTwoNodesTakeContiguousOffsets(t *testing.T) {
	a, b := twoNodes(t)
	var mu sync.Mutex
	var got []uint64
	var wg sync.WaitGroup
	for w := range 8 {
		n := a
		if w%2 == 1 {
			n = b
		}
		wg.Go(func() {
			for i := range 10 {
				res, err := n.broker.Publish(context.Background(), "race", fmt.Sprintf("k%d", i%3), centrifuge.MapPublishOptions{
					Data: []byte(fmt.Sprintf("%d/%d", w, i)),
					// Versioned, so that the version check runs
					// under the race too; each worker's versions
					// rise, so none is suppressed.
					Version: uint64(i + 1), VersionEpoch: fmt.Sprint(w),
				})
				if !assert.NoError(t, err) {
					return
				}
				if !res.Suppressed {
					mu.Lock()
					got = append(got, res.Position.Offset)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	sort.Slice(got, func(i, j int) bool { return got[i] < got[j] })
	require.Len(t, got, 80)
	for i, off := range got {
		require.Equal(t, uint64(i+1), off, "every change its own offset, none skipped")
	}
	stream := readStream(t, b.broker, "race", centrifuge.StreamFilter{Limit: -1})
	assert.Equal(t, got, offsets(stream.Publications))
}

func TestIdempotencyKeyHoldsAcrossNodes(t *testing.T) {
	a, b := twoNodes(t)
	opts := func(o *centrifuge.MapPublishOptions) { o.IdempotencyKey = "client-42-msg-7" }
	first := publish(t, a.broker, "chat", "m7", "hello", opts)
	retry := publish(t, b.broker, "chat", "m7", "hello", opts)
	assert.Equal(t, centrifuge.SuppressReasonIdempotency, retry.SuppressReason)
	assert.Equal(t, first.Position, retry.Position)
}

func TestClearOnOneNodeIsSeenByTheOther(t *testing.T) {
	a, b := twoNodes(t)
	ctx := context.Background()
	old := publish(t, a.broker, "room", "k", "v")
	require.NoError(t, b.broker.Clear(ctx, "room", centrifuge.MapClearOptions{}))
	_, err := a.broker.ReadState(ctx, "room", centrifuge.MapReadStateOptions{Revision: &old.Position, Limit: -1})
	assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
	res := publish(t, a.broker, "room", "k", "w")
	assert.Equal(t, uint64(1), res.Position.Offset)
	assert.NotEqual(t, old.Position.Epoch, res.Position.Epoch)
	pubs, _ := readAll(t, b.broker, "room")
	assert.Equal(t, []string{"k=w"}, keysData(pubs))
}

// A centrifuge node that runs on the broker, through the node's own map API.
func TestACentrifugeNodeRunsOnTheBroker(t *testing.T) {
	t.Parallel()
	schema := newSchema(t)
	a := newPgNode(t, schema)
	ctx := context.Background()
	node := newNode(t)
	store, pool := newStore(t, schema)
	b, err := New(node, Config{Store: store, Pool: pool, Logger: quietLogger()})
	require.NoError(t, err)
	node.SetMapBroker(b)
	require.NoError(t, node.Run())
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, node.Shutdown(sctx))
		require.NoError(t, b.Close(sctx))
	})
	res, err := node.MapPublish(ctx, "cars", "bmw", centrifuge.MapPublishOptions{Data: []byte(`{"hp":340}`)})
	require.NoError(t, err)
	assert.Equal(t, uint64(1), res.Position.Offset)
	state, err := node.MapStateRead(ctx, "cars", centrifuge.MapReadStateOptions{Limit: -1})
	require.NoError(t, err)
	assert.Equal(t, []string{`bmw={"hp":340}`}, keysData(state.Publications))
	stream, err := node.MapStreamRead(ctx, "cars", centrifuge.MapReadStreamOptions{Filter: centrifuge.StreamFilter{Limit: -1}})
	require.NoError(t, err)
	assert.Equal(t, []uint64{1}, offsets(stream.Publications))
	pubs, _ := readAll(t, a.broker, "cars")
	assert.Equal(t, []string{`bmw={"hp":340}`}, keysData(pubs), "another node sees it")
	stats, err := node.MapStats(ctx, "cars")
	require.NoError(t, err)
	assert.Equal(t, 1, stats.NumKeys)
	require.NoError(t, node.MapClear(ctx, "cars", centrifuge.MapClearOptions{}))
	require.NoError(t, b.Close(ctx), "Close may be called more than once (Shutdown calls it too)")
}

func TestClearRacingChangesLosesNoAcknowledgedOne(t *testing.T) {
	a, b := twoNodes(t)
	ctx := context.Background()
	publish(t, a.broker, "big-busy", "seed", "x")
	var mu sync.Mutex
	acked := make(map[string][]uint64) // by epoch
	total := 0                         // of acked
	progress := make(chan struct{}, 1) // an acknowledgement came
	// waitAcks waits until n changes in all were acknowledged.
	waitAcks := func(n int) {
		t.Helper()
		deadline := time.NewTimer(10 * time.Second)
		defer deadline.Stop()
		for {
			mu.Lock()
			got := total
			mu.Unlock()
			if got >= n {
				return
			}
			select {
			case <-progress:
			case <-deadline.C:
				t.Fatalf("%d changes acknowledged after 10s, want %d", got, n)
			}
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopWorkers := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopWorkers() // also when the test fails while they run
	for w := range 4 {
		n := a
		if w%2 == 1 {
			n = b
		}
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				res, err := n.broker.Publish(ctx, "big-busy", fmt.Sprintf("w%d-%d", w, i), centrifuge.MapPublishOptions{Data: []byte("v")})
				if !assert.NoError(t, err) {
					return
				}
				mu.Lock()
				acked[res.Position.Epoch] = append(acked[res.Position.Epoch], res.Position.Offset)
				total++
				mu.Unlock()
				select {
				case progress <- struct{}{}:
				default:
				}
			}
		})
	}
	waitAcks(20) // changes are under way
	require.NoError(t, b.broker.Clear(ctx, "big-busy", centrifuge.MapClearOptions{}))
	mu.Lock()
	cleared := total
	mu.Unlock()
	waitAcks(cleared + 20) // and go on after Clear
	stopWorkers()

	stream := readStream(t, a.broker, "big-busy", centrifuge.StreamFilter{Limit: -1})
	final := stream.Position.Epoch
	require.NotEmpty(t, acked[final], "changes went on after Clear")
	want := acked[final]
	sort.Slice(want, func(i, j int) bool { return want[i] < want[j] })
	assert.Equal(t, want, offsets(stream.Publications), "every change acknowledged in the new epoch is in its stream, and nothing else")
	stats, err := a.broker.Stats(ctx, "big-busy")
	require.NoError(t, err)
	assert.Equal(t, len(want), stats.NumKeys, "and in its state")
}
