package mapbroker

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// concurrentGroup runs count changes at once through nd's broker while
// another session holds the log's head, so that they queue and are made in
// groups (at most two: the one that waits for the head, and the rest); it
// returns their errors in call order.
func concurrentGroup(t *testing.T, nd *node, count int, change func(i int) error) []error {
	t.Helper()
	ctx := context.Background()
	holder, err := nd.pool.Begin(ctx)
	require.NoError(t, err)
	defer holder.Rollback(ctx)
	_, err = holder.Exec(ctx, "SELECT FROM "+pgx.Identifier{nd.store.Schema(), logHead}.Sanitize()+" FOR UPDATE")
	require.NoError(t, err)

	taken := nd.broker.queues.taken.Load()
	errs := make([]error, count)
	var wg sync.WaitGroup
	for i := range count {
		wg.Go(func() { errs[i] = change(i) })
	}
	require.Eventually(t, func() bool {
		q := &nd.broker.queues
		q.mu.Lock()
		defer q.mu.Unlock()
		pending := 0
		for _, cq := range q.channels {
			pending += len(cq.pending)
		}
		return q.taken.Load()-taken+int64(pending) == int64(count)
	}, 10*time.Second, time.Millisecond, "every change queued")
	require.NoError(t, holder.Rollback(ctx))
	wg.Wait()
	return errs
}

// Changes made together in one transaction see each other as if each had
// run alone, in some order: one if_new wins, one idempotency key writes
// once, and one compare-and-swap from a position succeeds.
func TestChangesMadeTogetherSeeEachOther(t *testing.T) {
	nd := pgOnly(t)
	ctx := context.Background()
	const ch, count = "group", 16
	first := publish(t, nd.broker, ch, "cas", "0")

	res := make([]centrifuge.MapUpdateResult, count)
	errs := concurrentGroup(t, nd, count, func(i int) (err error) {
		opts := centrifuge.MapPublishOptions{Data: []byte(fmt.Sprint(i))}
		key := fmt.Sprintf("plain%d", i)
		switch i % 4 {
		case 0:
			key, opts.KeyMode = "new", centrifuge.KeyModeIfNew
		case 1:
			key, opts.IdempotencyKey = fmt.Sprintf("idem%d", i), "once"
		case 2:
			key, opts.ExpectedPosition = "cas", &first.Position
		}
		res[i], err = nd.broker.Publish(ctx, ch, key, opts)
		return err
	})
	for i, err := range errs {
		require.NoError(t, err, "change %d", i)
	}
	require.Greater(t, nd.broker.queues.largest.Load(), int64(1), "changes were made in groups")

	written := map[int]int{}
	var idemPositions []centrifuge.StreamPosition
	for i, r := range res {
		if !r.Suppressed {
			written[i%4]++
		}
		switch i % 4 {
		case 0:
			if r.Suppressed {
				assert.Equal(t, centrifuge.SuppressReasonKeyExists, r.SuppressReason)
			}
		case 1:
			idemPositions = append(idemPositions, r.Position)
			if r.Suppressed {
				assert.Equal(t, centrifuge.SuppressReasonIdempotency, r.SuppressReason)
			}
		case 2:
			if r.Suppressed {
				assert.Equal(t, centrifuge.SuppressReasonPositionMismatch, r.SuppressReason)
			}
		}
	}
	assert.Equal(t, map[int]int{0: 1, 1: 1, 2: 1, 3: count / 4}, written, "one if_new, one idempotent write and one compare-and-swap win; every plain publication writes")
	for _, p := range idemPositions {
		assert.Equal(t, idemPositions[0], p, "every repeat of the idempotency key reports the one write's position")
	}

	// The stream holds exactly what was written, at contiguous offsets,
	// and the state agrees with it.
	stream := readStream(t, nd.broker, ch, centrifuge.StreamFilter{Limit: -1})
	assert.Len(t, stream.Publications, 1+1+1+1+count/4)
	for i, p := range stream.Publications {
		assert.Equal(t, first.Position.Offset+uint64(i), p.Offset)
	}
	state, pos := readAll(t, nd.broker, ch)
	assert.Equal(t, stream.Position, pos)
	assert.Len(t, state, 1+1+1+count/4, "new, one idem key, cas and the plain ones")
}

// A group whose transaction fails writes nothing; its changes then run
// alone, and the one at fault fails alone.
func TestAChangeThatFailsInAGroupFailsAlone(t *testing.T) {
	nd := pgOnly(t)
	ctx := context.Background()
	const ch, count = "group-fault", 8
	publish(t, nd.broker, ch, "warm", "0")
	_, err := nd.pool.Exec(ctx, "ALTER TABLE "+pgx.Identifier{nd.store.Schema(), ch}.Sanitize()+
		" ADD CONSTRAINT no_poison CHECK (val::text NOT LIKE '%poison%')")
	require.NoError(t, err)

	errs := concurrentGroup(t, nd, count, func(i int) error {
		data := fmt.Sprint(i)
		if i == 3 {
			data = `"poison"`
		}
		_, err := nd.broker.Publish(ctx, ch, fmt.Sprintf("k%d", i), centrifuge.MapPublishOptions{Data: []byte(data)})
		return err
	})
	require.Greater(t, nd.broker.queues.failed.Load(), int64(0), "a group failed")
	for i, err := range errs {
		if i == 3 {
			assert.ErrorContains(t, err, "no_poison", "the change at fault fails")
		} else {
			assert.NoError(t, err, "change %d, made alone after its group failed", i)
		}
	}
	state, _ := readAll(t, nd.broker, ch)
	assert.Len(t, state, count, "warm and every key but the poisoned one")
}

// A group writes its records a statement per kind, in key order, and its
// changes of one key in call order: every acknowledged change is the stream
// entry at the position it was told, and the state is what the stream
// leaves.
func TestAGroupsPositionsAreItsStreamEntries(t *testing.T) {
	nd := pgOnly(t)
	ctx := context.Background()
	const ch, count = "group-mixed", 24
	publish(t, nd.broker, ch, "a", "seed")
	publish(t, nd.broker, ch, "b1", "seed")

	type change struct {
		key    string
		remove bool
		data   string
	}
	changes := make([]change, count)
	for i := range changes {
		switch i % 4 {
		case 0:
			changes[i] = change{key: "a", data: fmt.Sprint(i)}
		case 1:
			changes[i] = change{key: "a", remove: true}
		case 2:
			changes[i] = change{key: fmt.Sprintf("b%d", i%3), data: fmt.Sprint(i)}
		default:
			changes[i] = change{key: fmt.Sprintf("b%d", i%3), remove: true}
		}
	}
	res := make([]centrifuge.MapUpdateResult, count)
	errs := concurrentGroup(t, nd, count, func(i int) (err error) {
		c := changes[i]
		if c.remove {
			res[i], err = nd.broker.Remove(ctx, ch, c.key, centrifuge.MapRemoveOptions{})
		} else {
			res[i], err = nd.broker.Publish(ctx, ch, c.key, centrifuge.MapPublishOptions{Data: []byte(c.data)})
		}
		return err
	})
	for i, err := range errs {
		require.NoError(t, err, "change %d", i)
	}
	require.Greater(t, nd.broker.queues.largest.Load(), int64(1), "changes were made in groups")
	require.Zero(t, nd.broker.queues.failed.Load(), "every group predicted its entries")

	stream := readStream(t, nd.broker, ch, centrifuge.StreamFilter{Limit: -1})
	byOffset := map[uint64]*centrifuge.Publication{}
	for _, p := range stream.Publications {
		byOffset[p.Offset] = p
	}
	acknowledged := 0
	for i, r := range res {
		if r.Suppressed {
			assert.Equal(t, centrifuge.SuppressReasonKeyNotFound, r.SuppressReason, "only a removal of a missing key is suppressed")
			continue
		}
		acknowledged++
		p := byOffset[r.Position.Offset]
		require.NotNil(t, p, "change %d's position %d is in the stream", i, r.Position.Offset)
		assert.Equal(t, changes[i].key, p.Key, "change %d", i)
		assert.Equal(t, changes[i].remove, p.Removed, "change %d", i)
		if !changes[i].remove {
			assert.Equal(t, changes[i].data, string(p.Data), "change %d", i)
		}
	}
	assert.Len(t, stream.Publications, 2+acknowledged, "the seeds and every acknowledged change, nothing else")
	for i, p := range stream.Publications {
		assert.Equal(t, stream.Publications[0].Offset+uint64(i), p.Offset, "contiguous")
	}

	want := map[string]string{}
	for _, p := range stream.Publications {
		if p.Removed {
			delete(want, p.Key)
		} else {
			want[p.Key] = string(p.Data)
		}
	}
	state, _ := readAll(t, nd.broker, ch)
	got := map[string]string{}
	for _, p := range state {
		got[p.Key] = string(p.Data)
	}
	assert.Equal(t, want, got, "the state is what the stream leaves")
}
