package mapbroker

import (
	"context"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The tests of this file run against both brokers: what centrifuge's memory
// broker does is the reference for pgstore's.

func TestPublishAppendsContiguousOffsetsInOneEpoch(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		_, before := readAll(t, s.broker, "cars")
		assert.Equal(t, uint64(0), before.Offset)
		var epoch string
		for i, key := range []string{"bmw", "audi", "bmw"} {
			res := publish(t, s.broker, "cars", key, `{"n":`+string(rune('1'+i))+`}`)
			require.False(t, res.Suppressed)
			assert.Equal(t, uint64(i+1), res.Position.Offset)
			if i == 0 {
				epoch = res.Position.Epoch
				require.NotEmpty(t, epoch)
			}
			assert.Equal(t, epoch, res.Position.Epoch, "publications keep the channel's epoch")
		}
		assert.Equal(t, before.Epoch, epoch, "reading an empty channel and publishing to it keep one epoch")

		pubs, pos := readAll(t, s.broker, "cars")
		assert.Equal(t, centrifuge.StreamPosition{Offset: 3, Epoch: epoch}, pos)
		assert.Equal(t, []string{`audi={"n":2}`, `bmw={"n":3}`}, keysData(pubs))
		assert.Equal(t, []uint64{2, 3}, offsets(pubs), "a state entry carries the offset of its last change")

		stream := readStream(t, s.broker, "cars", centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Epoch: epoch}, Limit: -1})
		assert.Equal(t, []uint64{1, 2, 3}, offsets(stream.Publications))
		assert.Equal(t, []string{`bmw={"n":1}`, `audi={"n":2}`, `bmw={"n":3}`}, keysData(stream.Publications))
		assert.Equal(t, pos, stream.Position)
	})
}

func TestStaleVersionIsSuppressed(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		v := func(version uint64, epoch string) func(*centrifuge.MapPublishOptions) {
			return func(o *centrifuge.MapPublishOptions) { o.Version, o.VersionEpoch = version, epoch }
		}
		require.False(t, publish(t, s.broker, "doc", "k", "v5", v(5, "a")).Suppressed)
		for _, stale := range []uint64{4, 5} {
			res := publish(t, s.broker, "doc", "k", "stale", v(stale, "a"))
			assert.True(t, res.Suppressed)
			assert.Equal(t, centrifuge.SuppressReasonVersion, res.SuppressReason)
			assert.Equal(t, uint64(1), res.Position.Offset, "a suppressed change appends nothing")
		}
		res := publish(t, s.broker, "doc", "k", "stale, no epoch", v(3, ""))
		assert.Equal(t, centrifuge.SuppressReasonVersion, res.SuppressReason, "an empty VersionEpoch compares with any")
		require.False(t, publish(t, s.broker, "doc", "k", "v6", v(6, "a")).Suppressed)
		require.False(t, publish(t, s.broker, "doc", "k", "other epoch", v(1, "b")).Suppressed, "another VersionEpoch starts again")
		require.False(t, publish(t, s.broker, "doc", "k", "unversioned").Suppressed)
		res = publish(t, s.broker, "doc", "k", "late", v(1, "b"))
		assert.Equal(t, centrifuge.SuppressReasonVersion, res.SuppressReason, "a publication without a version keeps the stored one")
		pubs, _ := readAll(t, s.broker, "doc")
		assert.Equal(t, []string{"k=unversioned"}, keysData(pubs))
	})
}

func TestKeyModes(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		mode := func(m centrifuge.KeyMode) func(*centrifuge.MapPublishOptions) {
			return func(o *centrifuge.MapPublishOptions) { o.KeyMode = m }
		}
		res := publish(t, s.broker, "lobby", "seat", "ann", mode(centrifuge.KeyModeIfExists))
		assert.Equal(t, centrifuge.SuppressReasonKeyNotFound, res.SuppressReason)
		require.False(t, publish(t, s.broker, "lobby", "seat", "ann", mode(centrifuge.KeyModeIfNew)).Suppressed)
		res = publish(t, s.broker, "lobby", "seat", "bob", mode(centrifuge.KeyModeIfNew))
		assert.True(t, res.Suppressed)
		assert.Equal(t, centrifuge.SuppressReasonKeyExists, res.SuppressReason)
		assert.Equal(t, uint64(1), res.Position.Offset)
		require.False(t, publish(t, s.broker, "lobby", "seat", "ann again", mode(centrifuge.KeyModeIfExists)).Suppressed)
		pubs, pos := readAll(t, s.broker, "lobby")
		assert.Equal(t, []string{"seat=ann again"}, keysData(pubs))
		assert.Equal(t, uint64(2), pos.Offset)
	})
}

func TestExpectedPositionIsCompareAndSwap(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		at := func(p centrifuge.StreamPosition) func(*centrifuge.MapPublishOptions) {
			return func(o *centrifuge.MapPublishOptions) { o.ExpectedPosition = &p }
		}
		first := publish(t, s.broker, "counter", "n", "1")
		publish(t, s.broker, "counter", "other", "x")
		epoch := first.Position.Epoch

		res := publish(t, s.broker, "counter", "n", "2", at(centrifuge.StreamPosition{Offset: 1, Epoch: epoch}))
		require.False(t, res.Suppressed)
		assert.Equal(t, uint64(3), res.Position.Offset)

		// A writer that read offset 1 lost the race: it gets what is there.
		res = publish(t, s.broker, "counter", "n", "2 again", at(centrifuge.StreamPosition{Offset: 1, Epoch: epoch}))
		assert.Equal(t, centrifuge.SuppressReasonPositionMismatch, res.SuppressReason)
		require.NotNil(t, res.CurrentEntry)
		assert.Equal(t, uint64(3), res.CurrentEntry.Offset)
		assert.Equal(t, "2", string(res.CurrentEntry.Data))
		assert.Equal(t, centrifuge.StreamPosition{Offset: 3, Epoch: epoch}, res.Position)

		res = publish(t, s.broker, "counter", "n", "wrong epoch", at(centrifuge.StreamPosition{Offset: 3, Epoch: "not-" + epoch}))
		assert.Equal(t, centrifuge.SuppressReasonPositionMismatch, res.SuppressReason)
		res = publish(t, s.broker, "counter", "absent", "x", at(centrifuge.StreamPosition{Offset: 3, Epoch: epoch}))
		assert.Equal(t, centrifuge.SuppressReasonPositionMismatch, res.SuppressReason, "a key that does not exist is at no position")

		rm, err := s.broker.Remove(context.Background(), "counter", "n", centrifuge.MapRemoveOptions{ExpectedPosition: &centrifuge.StreamPosition{Offset: 1, Epoch: epoch}})
		require.NoError(t, err)
		assert.Equal(t, centrifuge.SuppressReasonPositionMismatch, rm.SuppressReason)
		assert.Equal(t, uint64(3), rm.CurrentEntry.Offset)
		rm, err = s.broker.Remove(context.Background(), "counter", "n", centrifuge.MapRemoveOptions{ExpectedPosition: &centrifuge.StreamPosition{Offset: 3, Epoch: epoch}})
		require.NoError(t, err)
		require.False(t, rm.Suppressed)
		assert.Equal(t, uint64(4), rm.Position.Offset)
		rm, err = s.broker.Remove(context.Background(), "counter", "n", centrifuge.MapRemoveOptions{ExpectedPosition: &centrifuge.StreamPosition{Offset: 3, Epoch: epoch}})
		require.NoError(t, err)
		assert.Equal(t, centrifuge.SuppressReasonPositionMismatch, rm.SuppressReason, "CAS is checked before the key's absence")
	})
}

func TestIdempotencyKeySuppressesRetriesForItsTTL(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		idem := func(key string, ttl time.Duration) func(*centrifuge.MapPublishOptions) {
			return func(o *centrifuge.MapPublishOptions) { o.IdempotencyKey, o.IdempotentResultTTL = key, ttl }
		}
		first := publish(t, s.broker, "orders", "o1", "placed", idem("req-1", 500*time.Millisecond))
		require.False(t, first.Suppressed)
		publish(t, s.broker, "orders", "o2", "placed")

		retry := publish(t, s.broker, "orders", "o1", "placed twice", idem("req-1", 500*time.Millisecond))
		assert.True(t, retry.Suppressed)
		assert.Equal(t, centrifuge.SuppressReasonIdempotency, retry.SuppressReason)
		assert.Equal(t, first.Position, retry.Position, "a retry learns the position of the change it repeats")

		rm, err := s.broker.Remove(context.Background(), "orders", "o2", centrifuge.MapRemoveOptions{IdempotencyKey: "req-1"})
		require.NoError(t, err)
		assert.Equal(t, centrifuge.SuppressReasonIdempotency, rm.SuppressReason, "one key space per channel, for publications and removals")

		// Waiting for the result's TTL is waiting for time itself.
		time.Sleep(600 * time.Millisecond)
		later := publish(t, s.broker, "orders", "o1", "placed again", idem("req-1", time.Minute))
		assert.False(t, later.Suppressed, "the result is forgotten after its TTL")
		pubs, _ := readAll(t, s.broker, "orders")
		assert.Equal(t, []string{"o1=placed again", "o2=placed"}, keysData(pubs))
	})
}

func TestRemoveAppendsARemovalWithTheEntrysTags(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		tags := map[string]string{"team": "red"}
		publish(t, s.broker, "players", "ann", "1", func(o *centrifuge.MapPublishOptions) { o.Tags = tags })
		publish(t, s.broker, "players", "bob", "2")
		rm, err := s.broker.Remove(context.Background(), "players", "ann", centrifuge.MapRemoveOptions{})
		require.NoError(t, err)
		require.False(t, rm.Suppressed)
		assert.Equal(t, uint64(3), rm.Position.Offset)
		rm, err = s.broker.Remove(context.Background(), "players", "bob", centrifuge.MapRemoveOptions{Tags: map[string]string{"why": "left"}})
		require.NoError(t, err)
		require.False(t, rm.Suppressed)

		again, err := s.broker.Remove(context.Background(), "players", "ann", centrifuge.MapRemoveOptions{})
		require.NoError(t, err)
		assert.Equal(t, centrifuge.SuppressReasonKeyNotFound, again.SuppressReason)
		assert.Equal(t, uint64(4), again.Position.Offset)

		stream := readStream(t, s.broker, "players", centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Offset: 2, Epoch: rm.Position.Epoch}, Limit: -1})
		require.Len(t, stream.Publications, 2)
		assert.Equal(t, []string{"ann-", "bob-"}, keysData(stream.Publications))
		assert.Equal(t, tags, stream.Publications[0].Tags, "a removal carries the tags of what it removed")
		assert.Equal(t, map[string]string{"why": "left"}, stream.Publications[1].Tags, "or its own")
		assert.NotZero(t, stream.Publications[0].Time)
		pubs, _ := readAll(t, s.broker, "players")
		assert.Empty(t, pubs)
	})
}

func TestReadStatePagesWithACursor(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		for _, k := range []string{"e", "a", "d", "b", "c"} {
			publish(t, s.broker, "board", k, "v"+k)
		}
		ctx := context.Background()
		var keys []string
		cursor := ""
		for page := 0; ; page++ {
			res, err := s.broker.ReadState(ctx, "board", centrifuge.MapReadStateOptions{Cursor: cursor, Limit: 2})
			require.NoError(t, err)
			assert.LessOrEqual(t, len(res.Publications), 2)
			assert.Equal(t, uint64(5), res.Position.Offset)
			for _, p := range res.Publications {
				keys = append(keys, p.Key)
			}
			if res.Cursor == "" {
				break
			}
			cursor = res.Cursor
			require.Less(t, page, 5)
		}
		assert.Equal(t, []string{"a", "b", "c", "d", "e"}, keys)

		res, err := s.broker.ReadState(ctx, "board", centrifuge.MapReadStateOptions{Limit: 0})
		require.NoError(t, err)
		assert.Empty(t, res.Publications, "Limit 0 reads the position only")
		assert.Equal(t, uint64(5), res.Position.Offset)

		res, err = s.broker.ReadState(ctx, "board", centrifuge.MapReadStateOptions{Limit: -1})
		require.NoError(t, err)
		assert.Len(t, res.Publications, 5)
		assert.Empty(t, res.Cursor)

		res, err = s.broker.ReadState(ctx, "board", centrifuge.MapReadStateOptions{Key: "d", Limit: 1, Cursor: "x"})
		require.NoError(t, err)
		assert.Equal(t, []string{"d=vd"}, keysData(res.Publications), "Key reads one entry, whatever Cursor and Limit say")
		assert.Equal(t, uint64(3), res.Publications[0].Offset)
		res, err = s.broker.ReadState(ctx, "board", centrifuge.MapReadStateOptions{Key: "zz"})
		require.NoError(t, err)
		assert.Empty(t, res.Publications)
		assert.Equal(t, uint64(5), res.Position.Offset)
	})
}

func TestReadStateOfAnotherEpochIsUnrecoverable(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		res := publish(t, s.broker, "game", "k", "v")
		_, err := s.broker.ReadState(context.Background(), "game", centrifuge.MapReadStateOptions{Limit: -1, Revision: &res.Position})
		require.NoError(t, err)
		_, err = s.broker.ReadState(context.Background(), "game", centrifuge.MapReadStateOptions{Limit: -1,
			Revision: &centrifuge.StreamPosition{Offset: 1, Epoch: "another"}})
		assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
		_, err = s.broker.ReadState(context.Background(), "never-used", centrifuge.MapReadStateOptions{Limit: -1,
			Revision: &centrifuge.StreamPosition{}})
		assert.NoError(t, err, "an empty channel is at the empty revision")
	})
}

func TestReadStreamHonoursSinceLimitAndReverse(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		var epoch string
		for i := range 6 {
			epoch = publish(t, s.broker, "feed", "k"+string(rune('0'+i)), "v").Position.Epoch
		}
		since := func(o uint64) *centrifuge.StreamPosition { return &centrifuge.StreamPosition{Offset: o, Epoch: epoch} }
		for _, c := range []struct {
			name   string
			filter centrifuge.StreamFilter
			want   []uint64
		}{
			{"everything", centrifuge.StreamFilter{Limit: -1}, []uint64{1, 2, 3, 4, 5, 6}},
			{"the oldest two", centrifuge.StreamFilter{Limit: 2}, []uint64{1, 2}},
			{"position only", centrifuge.StreamFilter{Limit: 0}, nil},
			{"position only, since", centrifuge.StreamFilter{Since: since(2), Limit: 0}, nil},
			{"after 2", centrifuge.StreamFilter{Since: since(2), Limit: -1}, []uint64{3, 4, 5, 6}},
			{"two after 2", centrifuge.StreamFilter{Since: since(2), Limit: 2}, []uint64{3, 4}},
			{"after the end", centrifuge.StreamFilter{Since: since(6), Limit: -1}, nil},
			{"after 0", centrifuge.StreamFilter{Since: since(0), Limit: 3}, []uint64{1, 2, 3}},
			{"since without epoch", centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Offset: 4}, Limit: -1}, []uint64{5, 6}},
			{"newest first", centrifuge.StreamFilter{Reverse: true, Limit: -1}, []uint64{6, 5, 4, 3, 2, 1}},
			{"the newest two", centrifuge.StreamFilter{Reverse: true, Limit: 2}, []uint64{6, 5}},
			{"before 4", centrifuge.StreamFilter{Reverse: true, Since: since(4), Limit: -1}, []uint64{3, 2, 1}},
			{"two before 4", centrifuge.StreamFilter{Reverse: true, Since: since(4), Limit: 2}, []uint64{3, 2}},
			{"before 1", centrifuge.StreamFilter{Reverse: true, Since: since(1), Limit: -1}, nil},
		} {
			t.Run(c.name, func(t *testing.T) {
				res := readStream(t, s.broker, "feed", c.filter)
				assert.Equal(t, c.want, nilIfEmpty(offsets(res.Publications)))
				assert.Equal(t, centrifuge.StreamPosition{Offset: 6, Epoch: epoch}, res.Position)
			})
		}
		_, err := s.broker.ReadStream(context.Background(), "feed", centrifuge.MapReadStreamOptions{
			Filter: centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Offset: 2, Epoch: "another"}, Limit: -1}})
		assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
	})
}

func TestReadStreamKeepsStreamSizeEntries(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		for range 5 {
			publish(t, s.broker, "small", "k", "v")
		}
		res := readStream(t, s.broker, "small", centrifuge.StreamFilter{Limit: -1})
		assert.Equal(t, []uint64{3, 4, 5}, offsets(res.Publications), "StreamSize 3 keeps the newest 3")
		res = readStream(t, s.broker, "small", centrifuge.StreamFilter{Limit: -1, Reverse: true})
		assert.Equal(t, []uint64{5, 4, 3}, offsets(res.Publications))
		res = readStream(t, s.broker, "small", centrifuge.StreamFilter{Since: &centrifuge.StreamPosition{Offset: 3, Epoch: res.Position.Epoch}, Limit: -1})
		assert.Equal(t, []uint64{4, 5}, offsets(res.Publications))
	})
}

func TestStatsAndClear(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		ctx := context.Background()
		stats, err := s.broker.Stats(ctx, "room")
		require.NoError(t, err)
		assert.Equal(t, 0, stats.NumKeys)
		publish(t, s.broker, "room", "a", "1")
		old := publish(t, s.broker, "room", "b", "2", func(o *centrifuge.MapPublishOptions) { o.IdempotencyKey = "once" })
		stats, err = s.broker.Stats(ctx, "room")
		require.NoError(t, err)
		assert.Equal(t, 2, stats.NumKeys)

		require.NoError(t, s.broker.Clear(ctx, "room", centrifuge.MapClearOptions{}))
		stats, err = s.broker.Stats(ctx, "room")
		require.NoError(t, err)
		assert.Equal(t, 0, stats.NumKeys)
		pubs, pos := readAll(t, s.broker, "room")
		assert.Empty(t, pubs)
		assert.Equal(t, uint64(0), pos.Offset)
		assert.NotEqual(t, old.Position.Epoch, pos.Epoch, "Clear starts a new epoch")

		_, err = s.broker.ReadState(ctx, "room", centrifuge.MapReadStateOptions{Revision: &old.Position, Limit: -1})
		assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
		_, err = s.broker.ReadStream(ctx, "room", centrifuge.MapReadStreamOptions{Filter: centrifuge.StreamFilter{Since: &old.Position, Limit: -1}})
		assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)

		again := publish(t, s.broker, "room", "b", "3", func(o *centrifuge.MapPublishOptions) { o.IdempotencyKey = "once" })
		assert.False(t, again.Suppressed, "Clear forgets idempotency results")
		assert.Equal(t, centrifuge.StreamPosition{Offset: 1, Epoch: pos.Epoch}, again.Position, "the new epoch starts at offset 1 and is the one read before")
		require.NoError(t, s.broker.Clear(ctx, "never-used", centrifuge.MapClearOptions{}))
	})
}

func TestKeyTTLRemovesKeysThroughTheStream(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		s.subscribe(t, "rec-presence")
		tags := map[string]string{"role": "guest"}
		first := publish(t, s.broker, "rec-presence", "ann", "here", func(o *centrifuge.MapPublishOptions) { o.Tags = tags })
		publish(t, s.broker, "rec-presence", "bob", "here")
		// Bob keeps himself alive with a suppressed if_new that refreshes
		// his TTL, as presence heartbeats do; Ann does not.
		stop := time.After(1700 * time.Millisecond)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
	beat:
		for {
			select {
			case <-stop:
				break beat
			case <-tick.C:
				res := publish(t, s.broker, "rec-presence", "bob", "still here", func(o *centrifuge.MapPublishOptions) {
					o.KeyMode, o.RefreshTTLOnSuppress = centrifuge.KeyModeIfNew, true
				})
				require.Equal(t, centrifuge.SuppressReasonKeyExists, res.SuppressReason)
			}
		}
		require.Eventually(t, func() bool {
			pubs, _ := readAll(t, s.broker, "rec-presence")
			return len(pubs) == 1
		}, 5*time.Second, 50*time.Millisecond)
		pubs, pos := readAll(t, s.broker, "rec-presence")
		assert.Equal(t, []string{"bob=here"}, keysData(pubs))
		assert.Equal(t, uint64(3), pos.Offset)
		stream := readStream(t, s.broker, "rec-presence", centrifuge.StreamFilter{Since: &first.Position, Limit: -1})
		require.Len(t, stream.Publications, 2)
		removal := stream.Publications[1]
		assert.Equal(t, "ann-", keysData([]*centrifuge.Publication{removal})[0])
		assert.Equal(t, tags, removal.Tags)
		got := s.rec.wait(t, "rec-presence", 3)
		assert.True(t, got[2].pub.Removed, "the expiry is delivered like a removal")
		assert.Equal(t, uint64(3), got[2].sp.Offset)
	})
}

func TestMetaTTLStartsANewEpochForAnIdleChannel(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		res := publish(t, s.broker, "meta-room", "k", "v")
		// Reads renew the MetaTTL: wait without reading, for the memory
		// broker's one-second sweep at most. Waiting for a TTL is waiting
		// for time itself.
		time.Sleep(2200 * time.Millisecond)
		_, pos := readAll(t, s.broker, "meta-room")
		assert.NotEqual(t, res.Position.Epoch, pos.Epoch, "a channel idle for its MetaTTL is dropped")
		_, err := s.broker.ReadStream(context.Background(), "meta-room", centrifuge.MapReadStreamOptions{
			Filter: centrifuge.StreamFilter{Since: &res.Position, Limit: -1}})
		assert.ErrorIs(t, err, centrifuge.ErrorUnrecoverablePosition)
	})
}

func TestPublicationFieldsRoundTripExactly(t *testing.T) {
	cases := map[string][]byte{
		"json with its spacing": []byte(`{ "b" : 1,  "a":[1 , 2] }`),
		"binary":                {0x00, 0xff, 0xfe, 0x01, 'x'},
		"invalid utf-8":         []byte("caf\xe9"),
		"html and escapes":      []byte(`<a href="x">&amp;</a>` + "\t\u2028\\"),
		"empty":                 {},
	}
	forEachBroker(t, func(t *testing.T, s subject) {
		s.subscribe(t, "bytes")
		info := &centrifuge.ClientInfo{ClientID: "c1", UserID: "u1", ConnInfo: []byte(`{"x":1}`), ChanInfo: []byte{0, 1, 2}}
		n := 0
		for name, data := range cases {
			n++
			publish(t, s.broker, "bytes", name, "", func(o *centrifuge.MapPublishOptions) {
				o.Data, o.ClientInfo, o.Tags = data, info, map[string]string{"name": name, "quote": `"'`}
			})
		}
		check := func(where string, pubs []*centrifuge.Publication) {
			require.Len(t, pubs, len(cases), where)
			for _, p := range pubs {
				assert.Equal(t, string(cases[p.Key]), string(p.Data), "%s: %s", where, p.Key)
				assert.Equal(t, p.Key, p.Tags["name"], where)
				assert.Equal(t, `"'`, p.Tags["quote"], where)
				require.NotNil(t, p.Info, where)
				assert.Equal(t, info.ClientID, p.Info.ClientID, where)
				assert.Equal(t, info.UserID, p.Info.UserID, where)
				assert.Equal(t, info.ConnInfo, p.Info.ConnInfo, where)
				assert.Equal(t, info.ChanInfo, p.Info.ChanInfo, where)
			}
		}
		pubs, _ := readAll(t, s.broker, "bytes")
		check("state", pubs)
		check("stream", readStream(t, s.broker, "bytes", centrifuge.StreamFilter{Limit: -1}).Publications)
		var live []*centrifuge.Publication
		for _, d := range s.rec.wait(t, "bytes", n) {
			live = append(live, d.pub)
		}
		check("delivery", live)
	})
}

func TestDeltaPublicationsCarryThePreviousEntry(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		s.subscribe(t, "deltas")
		delta := func(o *centrifuge.MapPublishOptions) { o.UseDelta = true }
		publish(t, s.broker, "deltas", "doc", "first", delta)
		publish(t, s.broker, "deltas", "doc", "second", delta)
		publish(t, s.broker, "deltas", "doc", "third")
		got := s.rec.wait(t, "deltas", 3)
		assert.True(t, got[0].delta)
		assert.Nil(t, got[0].prev, "a new key has nothing to diff with")
		assert.True(t, got[1].delta)
		require.NotNil(t, got[1].prev)
		assert.Equal(t, "first", string(got[1].prev.Data))
		assert.False(t, got[2].delta)
		assert.Nil(t, got[2].prev)
	})
}

func TestReadsRenewTheMetaTTL(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		res := publish(t, s.broker, "meta-watched", "k", "v")
		// As the node's position checks of a channel's subscribers do.
		for range 25 {
			time.Sleep(100 * time.Millisecond)
			got := readStream(t, s.broker, "meta-watched", centrifuge.StreamFilter{Limit: 0})
			require.Equal(t, res.Position.Epoch, got.Position.Epoch, "a channel that is read is not idle")
		}
	})
}

func TestStateAndStreamFitTogetherUnderConcurrentWrites(t *testing.T) {
	forEachBroker(t, func(t *testing.T, s subject) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error, 4)
		for w := range 4 {
			go func() {
				for i := 0; i < 300 && ctx.Err() == nil; i++ {
					key := string(rune('a' + (i*7+w)%20))
					var err error
					if i%5 == 4 {
						_, err = s.broker.Remove(ctx, "big-live", key, centrifuge.MapRemoveOptions{})
					} else {
						_, err = s.broker.Publish(ctx, "big-live", key, centrifuge.MapPublishOptions{Data: []byte{byte(w), byte(i)}})
					}
					if err != nil && ctx.Err() == nil {
						done <- err
						return
					}
				}
				done <- nil
			}()
		}
		time.Sleep(50 * time.Millisecond)
		// A client's first subscription: pages of the state, each at its
		// own position, then the stream after the first page's.
		state := make(map[string]*centrifuge.Publication)
		var from *centrifuge.StreamPosition
		cursor := ""
		for {
			res, err := s.broker.ReadState(ctx, "big-live", centrifuge.MapReadStateOptions{Cursor: cursor, Limit: 3})
			require.NoError(t, err)
			if from == nil {
				from = &res.Position
			}
			for _, p := range res.Publications {
				state[p.Key] = p
			}
			if res.Cursor == "" {
				break
			}
			cursor = res.Cursor
		}
		time.Sleep(50 * time.Millisecond)
		cancel()
		for range 4 {
			require.NoError(t, <-done)
		}
		stream := readStream(t, s.broker, "big-live", centrifuge.StreamFilter{Since: from, Limit: -1})
		require.Equal(t, from.Epoch, stream.Position.Epoch)
		for i, p := range stream.Publications {
			require.Equal(t, from.Offset+uint64(i)+1, p.Offset, "contiguous")
			if held, ok := state[p.Key]; ok && held.Offset >= p.Offset {
				continue // the page already held this change, or a later one
			}
			if p.Removed {
				delete(state, p.Key)
			} else {
				state[p.Key] = p
			}
		}
		final, _ := readAll(t, s.broker, "big-live")
		want := make(map[string]string)
		for _, p := range final {
			want[p.Key] = string(p.Data)
		}
		got := make(map[string]string)
		for k, p := range state {
			got[k] = string(p.Data)
		}
		assert.Equal(t, want, got, "state pages plus the stream after them make the final state")
	})
}

func nilIfEmpty(s []uint64) []uint64 {
	if len(s) == 0 {
		return nil
	}
	return s
}
