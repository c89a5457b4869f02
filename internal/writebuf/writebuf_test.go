package writebuf_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/pgstore/pgstore/internal/writebuf"
)

// Every Buffer a test starts is closed by the test; goleak proves that its
// flusher, and whatever the fake sink was waiting on, have ended.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var quiet = slog.New(slog.DiscardHandler)

// Times of the deadline tests: short, so that the package's tests stay fast,
// and asserted only as upper bounds with room to spare.
const (
	retryTimeout = 100 * time.Millisecond
	minAttempt   = 20 * time.Millisecond
	slack        = 100 * time.Millisecond
)

func config() writebuf.Config {
	return writebuf.Config{
		MaxBatch:     100,
		Limit:        1 << 20,
		RetryTimeout: 2 * time.Second,
		MinAttempt:   minAttempt,
		Logger:       quiet,
	}
}

// start runs a Buffer over the sink for one test. When the test ends its
// gates open, the buffer closes and the sink must have seen nothing amiss.
func start(t *testing.T, cfg writebuf.Config, s *fakeSink) *writebuf.Buffer {
	t.Helper()
	s.maxBatch, s.guard = cfg.MaxBatch, cfg.Guard
	b := writebuf.New(cfg, s)
	t.Cleanup(func() {
		s.release()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		assert.NoError(t, b.Close(ctx), "closing the buffer")
		assert.Empty(t, s.Problems(), "what the sink saw:\n%s", s.describe())
	})
	return b
}

func set(id string, version int64, value string) writebuf.Op {
	return writebuf.Op{Table: "t", Handle: handle("t"), ID: id, Version: version, Value: []byte(value)}
}

func del(id string, version int64) writebuf.Op {
	return writebuf.Op{Table: "t", Handle: handle("t"), ID: id, Version: version}
}

func in(table string, op writebuf.Op) writebuf.Op {
	op.Table, op.Handle = table, handle(table)
	return op
}

func k(id string) key { return key{"t", id} }

// enqueue enqueues an op that must be accepted.
func enqueue(t *testing.T, b *writebuf.Buffer, op writebuf.Op) *writebuf.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r := b.Enqueue(ctx, op)
	if !r.Accepted() {
		require.FailNow(t, "not accepted", "%s/%s@%d: %v", op.Table, op.ID, op.Version, r.Wait(ctx))
	}
	return r
}

// outcome waits for a write's outcome.
func outcome(t *testing.T, r *writebuf.Result) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := r.Wait(ctx)
	require.NoError(t, ctx.Err(), "the write got no outcome")
	return err
}

// finished reports whether r has its outcome, without waiting. Wait with an
// ended context chooses at random between two ready channels, so 64 tries
// tell a finished Result from an unfinished one but for a chance of 2^-64.
func finished(r *writebuf.Result) bool {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 64 {
		if err := r.Wait(ctx); err != context.Canceled { // Wait returns ctx.Err() itself, unwrapped
			return true
		}
	}
	return false
}

func closeBuffer(t *testing.T, b *writebuf.Buffer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, b.Close(ctx))
}

// ---- Coalescing ----

func TestTheLastWriteToAKeyWins(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour // the writes wait, and coalesce, until Close
	b := start(t, cfg, s)

	r1 := enqueue(t, b, set("k", 1, "one"))
	r2 := enqueue(t, b, set("k", 2, "two"))
	r3 := enqueue(t, b, set("k", 3, "three"))
	closeBuffer(t, b)

	for _, r := range []*writebuf.Result{r1, r2, r3} {
		require.NoError(t, outcome(t, r))
	}
	calls := s.Calls()
	require.Len(t, calls, 1)
	require.Equal(t, []sent{{k("k"), 3, "three", false}}, calls[0].writes, "only the newest write to a key is sent")
	require.Equal(t, map[key]string{k("k"): "three"}, s.Rows())
}

func TestALaterWriteToAKeyReplacesTheBufferedOneAndSharesItsOutcome(t *testing.T) {
	s := newSink().then(refusing("k"))
	cfg := config()
	cfg.Interval = time.Hour
	b := start(t, cfg, s)

	older := enqueue(t, b, set("k", 1, "old"))
	newer := enqueue(t, b, set("k", 2, "new"))
	other := enqueue(t, b, set("j", 1, "j"))
	closeBuffer(t, b)

	require.Equal(t, []string{"k", "j"}, s.Calls()[0].ids(), "the newer write took the older one's place")
	errNewer := outcome(t, newer)
	require.ErrorIs(t, errNewer, errRefused)
	require.Equal(t, errNewer, outcome(t, older), "the replaced write shares the outcome of the one that replaced it")
	require.NoError(t, outcome(t, other))
	require.Equal(t, map[key]string{k("j"): "j"}, s.Rows())
}

func TestADeleteAfterASetDeletesTheKey(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	b := start(t, config(), s)

	first := enqueue(t, b, set("k", 1, "x"))
	s.nextCall(t) // held at the gate, so that the next writes gather
	setAgain := enqueue(t, b, set("k", 2, "y"))
	deleted := enqueue(t, b, del("k", 3))
	version, value, ok := b.Lookup("t", "k")
	require.True(t, ok)
	require.Equal(t, int64(3), version)
	require.Nil(t, value, "a buffered delete reads as a nil value")
	close(g)

	for _, r := range []*writebuf.Result{first, setAgain, deleted} {
		require.NoError(t, outcome(t, r))
	}
	calls := s.Calls()
	require.Len(t, calls, 2)
	require.Equal(t, []sent{{k("k"), 3, "", true}}, calls[1].writes, "the delete replaced the set")
	require.Empty(t, s.Rows(), "the row the first write made is gone")
}

func TestWithoutTheGuardASetAfterABufferedDeleteReplacesIt(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	b := start(t, cfg, s)

	enqueue(t, b, set("a", 1, "a"))
	enqueue(t, b, del("k", 2))
	enqueue(t, b, set("k", 3, "back"))
	closeBuffer(t, b)

	require.Equal(t, []int{2}, s.Sizes())
	require.Equal(t, map[key]string{k("a"): "a", k("k"): "back"}, s.Rows())
}

// ---- Reads ----

func TestLookupSeesBufferedWritesIncludingThoseBeingWritten(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	b := start(t, config(), s)

	ra := enqueue(t, b, set("a", 1, "A"))
	s.nextCall(t)
	rb := enqueue(t, b, set("b", 7, "B"))

	version, value, ok := b.Lookup("t", "a")
	require.True(t, ok, "a write being written is still buffered")
	require.Equal(t, int64(1), version)
	require.Equal(t, []byte("A"), value)
	version, value, ok = b.Lookup("t", "b")
	require.True(t, ok)
	require.Equal(t, int64(7), version)
	require.Equal(t, []byte("B"), value)
	_, _, ok = b.Lookup("t", "never written")
	require.False(t, ok)
	_, _, ok = b.Lookup("other table", "a")
	require.False(t, ok, "keys are per table")

	close(g)
	require.NoError(t, outcome(t, ra))
	require.NoError(t, outcome(t, rb))
	_, _, ok = b.Lookup("t", "a")
	require.False(t, ok, "a durable write is read from the table, not the buffer")
	st := b.Stats()
	writes, bytes := st.Writes, st.Bytes
	require.Zero(t, writes)
	require.Zero(t, bytes)
}

func TestLookupNoLongerSeesAFailedWriteOnceItsOutcomeIsReported(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, fail(writebuf.Permanent)))
	b := start(t, config(), s)

	r := enqueue(t, b, set("a", 1, "A"))
	s.nextCall(t)
	_, _, ok := b.Lookup("t", "a")
	require.True(t, ok)
	close(g)

	require.ErrorIs(t, outcome(t, r), errPermanent)
	_, _, ok = b.Lookup("t", "a")
	require.False(t, ok, "a reader must not see a write that failed")
	require.Empty(t, s.Rows())
}

// ---- Order ----

func TestBatchesReachTheSinkOneAtATimeInOrderAndOnlyOnceTheEarlierOnesComplete(t *testing.T) {
	const n = 40
	s := newSink()
	cfg := config()
	cfg.MaxBatch = 1
	b := start(t, cfg, s)

	var mu sync.Mutex
	var results []*writebuf.Result // in the order enqueued
	s.onWrite = func(batch *writebuf.Batch) {
		var i int
		if _, err := fmt.Sscanf(batch.Tables[0].Writes[0].ID, "k%d", &i); err != nil {
			s.problem("unexpected ID: %v", err)
			return
		}
		mu.Lock()
		earlier := slices.Clone(results[:min(i, len(results))])
		mu.Unlock()
		if len(earlier) < i {
			s.problem("k%02d reached the sink before k%02d was enqueued", i, len(earlier))
		}
		for j, r := range earlier {
			if !finished(r) {
				s.problem("k%02d reached the sink before k%02d had its outcome", i, j)
			}
		}
	}
	var ids []string
	for i := range n {
		id := fmt.Sprintf("k%02d", i)
		ids = append(ids, id)
		r := enqueue(t, b, set(id, 1, id))
		mu.Lock()
		results = append(results, r)
		mu.Unlock()
	}
	for _, r := range results {
		require.NoError(t, outcome(t, r))
	}

	var got []string
	for _, c := range s.Calls() {
		got = append(got, c.ids()...)
	}
	require.Equal(t, ids, got)
	// The sink itself notes a call made while another was in progress.
}

func TestConcurrentWritersNeverSeeALaterWriteToAKeyOvertakeAnEarlierOne(t *testing.T) {
	const writers, rounds = 4, 30
	s := newSink()
	cfg := config()
	cfg.MaxBatch = 3
	b := start(t, cfg, s)

	errs := make(chan error, writers)
	for w := range writers {
		go func() {
			var err error
			for round := range rounds {
				for _, id := range []string{"a", "b"} {
					op := set(fmt.Sprintf("w%d-%s", w, id), int64(round), fmt.Sprint(round))
					if r := b.Enqueue(context.Background(), op); !r.Accepted() {
						err = errors.Join(err, r.Wait(context.Background()))
					}
				}
			}
			errs <- err
		}()
	}
	for range writers {
		require.NoError(t, <-errs)
	}
	closeBuffer(t, b)

	last := make(map[key]int64)
	for _, c := range s.Calls() {
		for _, w := range c.writes {
			prev, seen := last[w.key]
			require.False(t, seen && w.version < prev, "%s@%d sent after %s@%d", w.key, w.version, w.key, prev)
			last[w.key] = w.version
		}
	}
	rows := s.Rows()
	require.Len(t, rows, 2*writers)
	for _, v := range rows {
		require.Equal(t, fmt.Sprint(rounds-1), v, "every key ends with its last write")
	}
}

// ---- Batching ----

func TestMaxBatchBoundsTheWritesOfABatch(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 3
	b := start(t, cfg, s)

	for i := range 10 {
		enqueue(t, b, set(fmt.Sprint(i), 1, "v"))
	}
	closeBuffer(t, b)

	require.Equal(t, []int{3, 3, 3, 1}, s.Sizes(), "a full batch goes out; a new one takes the next writes")
	require.Len(t, s.Rows(), 10)
}

func TestAFullBatchGoesOutWithoutWaitingForTheInterval(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 2
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	require.Equal(t, []string{"a", "b"}, s.nextCall(t).ids())
	require.NoError(t, outcome(t, ra))
	require.NoError(t, outcome(t, rb))
}

func TestWritesWaitOutTheIntervalToCoalesce(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	b := start(t, cfg, s)

	enqueue(t, b, set("a", 1, "A"))
	enqueue(t, b, set("b", 1, "B"))
	enqueue(t, b, set("a", 2, "A2"))
	s.noCallFor(t, 30*time.Millisecond)
	closeBuffer(t, b)

	require.Equal(t, []int{2}, s.Sizes())
}

func TestWithNoIntervalAWriteGoesOutAtOnceAndTheNextBatchGathersWhileItIsWritten(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	b := start(t, config(), s) // Interval 0: group commit

	first := enqueue(t, b, set("first", 1, "x"))
	require.Equal(t, []string{"first"}, s.nextCall(t).ids(), "no interval: the write went out alone, at once")
	var gathered []*writebuf.Result
	for i := range 5 {
		gathered = append(gathered, enqueue(t, b, set(fmt.Sprint(i), 1, "y")))
	}
	close(g)

	require.NoError(t, outcome(t, first))
	require.Equal(t, 5, s.nextCall(t).size(), "the writes that came meanwhile went out together")
	for _, r := range gathered {
		require.NoError(t, outcome(t, r))
	}
}

// ---- Memory ----

func TestBufferedCountsTheWritesAndTheBytesTheyHold(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	b := start(t, cfg, s)

	requireBuffered := func(writes, bytes int) {
		t.Helper()
		st := b.Stats()
		w, by := st.Writes, st.Bytes
		require.Equal(t, writes, w, "writes")
		require.Equal(t, bytes, by, "bytes")
	}
	enqueue(t, b, set("a", 1, "0123456789"))
	first := 10 + writebuf.ResultOverhead + len("a") + writebuf.KeyOverhead
	requireBuffered(1, first)
	enqueue(t, b, set("a", 2, "abcd")) // replaces the value; the call still costs a Result
	second := first + 4 - 10 + writebuf.ResultOverhead
	requireBuffered(1, second)
	enqueue(t, b, del("bb", 3))
	requireBuffered(2, second+writebuf.ResultOverhead+len("bb")+writebuf.KeyOverhead)

	closeBuffer(t, b)
	requireBuffered(0, 0)
}

const (
	value10 = "0123456789"
	// One write of value10 to a one-letter ID, and no room for another.
	oneWriteLimit = 10 + writebuf.ResultOverhead + 1 + writebuf.KeyOverhead + 40
)

func TestAFullBufferMakesEnqueueWaitForRoom(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	cfg := config()
	cfg.Limit = oneWriteLimit
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, value10))
	s.nextCall(t)
	accepted := make(chan *writebuf.Result, 1)
	go func() { accepted <- b.Enqueue(context.Background(), set("b", 1, value10)) }()
	select {
	case <-accepted:
		require.FailNow(t, "a write was accepted into a full buffer")
	case <-time.After(30 * time.Millisecond):
	}
	close(g)

	rb := <-accepted
	require.True(t, rb.Accepted(), "the writer got room once the first write was out")
	require.NoError(t, outcome(t, ra))
	require.NoError(t, outcome(t, rb))
	require.Equal(t, map[key]string{k("a"): value10, k("b"): value10}, s.Rows())
}

func TestEnqueuesContextBoundsItsWaitForRoomAndNothingIsLost(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	cfg := config()
	cfg.Limit = oneWriteLimit
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, value10))
	s.nextCall(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	rb := b.Enqueue(ctx, set("b", 1, value10))

	require.False(t, rb.Accepted())
	require.ErrorIs(t, rb.Wait(context.Background()), context.DeadlineExceeded)
	_, _, ok := b.Lookup("t", "b")
	require.False(t, ok, "the refused write is not buffered")
	writes := b.Stats().Writes
	require.Equal(t, 1, writes)
	close(g)
	require.NoError(t, outcome(t, ra), "the accepted write still lands")
	require.Equal(t, map[key]string{k("a"): value10}, s.Rows())
}

func TestAFullBufferIsFlushedWithoutWaitingForTheInterval(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	cfg.Limit = oneWriteLimit
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, value10))
	rb := enqueue(t, b, set("b", 1, value10)) // waits for a, which goes out early
	require.NoError(t, outcome(t, ra))
	require.Equal(t, []int{1}, s.Sizes())
	closeBuffer(t, b)
	require.NoError(t, outcome(t, rb))
}

func TestAWriteLargerThanTheLimitIsAcceptedIntoAnEmptyBuffer(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Limit = 100
	b := start(t, cfg, s)

	big := string(make([]byte, 1000))
	require.NoError(t, outcome(t, enqueue(t, b, set("big", 1, big))))
	require.NoError(t, outcome(t, enqueue(t, b, set("big2", 1, big))))
}

// ---- Close ----

func TestCloseFlushesEverything(t *testing.T) {
	s := newSink()
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 7
	b := start(t, cfg, s)

	var results []*writebuf.Result
	for i := range 50 {
		table := []string{"a", "b"}[i%2]
		results = append(results, enqueue(t, b, in(table, set(fmt.Sprint(i), 1, "v"))))
	}
	closeBuffer(t, b)

	for _, r := range results {
		require.True(t, finished(r), "Close returns once every write has its outcome")
		require.NoError(t, outcome(t, r))
	}
	require.Len(t, s.Rows(), 50)
	st := b.Stats()
	writes, bytes := st.Writes, st.Bytes
	require.Zero(t, writes)
	require.Zero(t, bytes)
}

func TestCloseWhoseContextEndsFailsUnsentWritesWithErrClosed(t *testing.T) {
	s := newSink().then(hang(writebuf.Transient))
	cfg := config()
	cfg.MaxBatch = 1
	cfg.RetryTimeout = time.Minute
	b := start(t, cfg, s)

	var results []*writebuf.Result
	for i := range 5 {
		results = append(results, enqueue(t, b, set(fmt.Sprint(i), 1, "v")))
	}
	s.nextCall(t) // the first is in flight, the sink holding it
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, b.Close(ctx), context.DeadlineExceeded)

	for i, r := range results {
		require.True(t, finished(r), "write %d has its outcome when Close returns", i)
		err := outcome(t, r)
		require.ErrorIs(t, err, writebuf.ErrClosed, "write %d", i)
		require.NotErrorIs(t, err, writebuf.ErrOutcomeUnknown, "write %d", i)
	}
	require.Len(t, s.Calls(), 1, "no write went out after Close's context ended")
	require.Empty(t, s.Rows())
}

func TestCloseWhoseContextEndsDuringALostCommitReportsOnlyThatBatchAsUnknown(t *testing.T) {
	hangLost := hang(writebuf.Unknown) // the commit went out; its reply never comes
	hangLost.answers = []answer{truth} // Resolve cannot ask once the context has ended
	s := newSink().then(hangLost)
	cfg := config()
	cfg.MaxBatch = 1
	cfg.RetryTimeout = time.Minute
	b := start(t, cfg, s)

	inFlight := enqueue(t, b, set("sent", 1, "v"))
	s.nextCall(t)
	var unsent []*writebuf.Result
	for i := range 4 {
		unsent = append(unsent, enqueue(t, b, set(fmt.Sprint(i), 1, "v")))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, b.Close(ctx), context.DeadlineExceeded)

	require.ErrorIs(t, outcome(t, inFlight), writebuf.ErrOutcomeUnknown)
	for i, r := range unsent {
		err := outcome(t, r)
		require.ErrorIs(t, err, writebuf.ErrClosed, "unsent write %d", i)
		require.NotErrorIs(t, err, writebuf.ErrOutcomeUnknown, "unsent write %d", i)
	}
	require.Len(t, s.Calls(), 1)
	require.Equal(t, 1, s.Resolves())
}

func TestEnqueueAfterCloseReturnsErrClosed(t *testing.T) {
	s := newSink()
	b := start(t, config(), s)
	closeBuffer(t, b)
	closeBuffer(t, b) // closing again is harmless

	r := b.Enqueue(context.Background(), set("late", 1, "v"))
	require.False(t, r.Accepted())
	require.ErrorIs(t, r.Wait(context.Background()), writebuf.ErrClosed)
	_, _, ok := b.Lookup("t", "late")
	require.False(t, ok)
	require.Empty(t, s.Calls())
}

func TestAWriterWaitingForRoomGetsErrClosedWhenTheBufferCloses(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	cfg := config()
	cfg.Limit = oneWriteLimit
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, value10))
	s.nextCall(t)
	waiting := make(chan *writebuf.Result, 1)
	go func() { waiting <- b.Enqueue(context.Background(), set("b", 1, value10)) }()
	closed := make(chan error, 1)
	go func() { closed <- b.Close(context.Background()) }()

	rb := <-waiting
	require.False(t, rb.Accepted())
	require.ErrorIs(t, rb.Wait(context.Background()), writebuf.ErrClosed)
	close(g)
	require.NoError(t, <-closed)
	require.NoError(t, outcome(t, ra))
}

func TestFailedIsTheResultOfAWriteNeverAccepted(t *testing.T) {
	why := errors.New("refused")
	r := writebuf.Failed(why)
	require.False(t, r.Accepted())
	require.True(t, finished(r))
	require.Equal(t, why, r.Wait(context.Background()))
}

// ---- Version guard ----

var errConflict = errors.New("version conflict")

func guarded(cfg writebuf.Config, refused *[]string) writebuf.Config {
	cfg.Guard = true
	cfg.Conflict = func(table, id string, version, newer int64) error {
		*refused = append(*refused, fmt.Sprintf("%s/%s@%d<%d", table, id, version, newer))
		return fmt.Errorf("%w: %s/%s@%d", errConflict, table, id, version)
	}
	return cfg
}

func TestTheGuardRefusesASetOlderThanTheBufferedOneAtOnce(t *testing.T) {
	s := newSink()
	var refused []string // appended to by Enqueue, on this goroutine
	cfg := guarded(config(), &refused)
	cfg.Interval = time.Hour
	b := start(t, cfg, s)

	enqueue(t, b, set("k", 5, "five"))
	older := b.Enqueue(context.Background(), set("k", 3, "three"))
	require.False(t, older.Accepted(), "refused without waiting for the server")
	require.ErrorIs(t, older.Wait(context.Background()), errConflict)
	require.Equal(t, []string{"t/k@3<5"}, refused, "Conflict makes the error, with the buffered version that refused it")
	version, value, _ := b.Lookup("t", "k")
	require.Equal(t, int64(5), version)
	require.Equal(t, []byte("five"), value)

	equal := enqueue(t, b, set("k", 5, "five again"))
	closeBuffer(t, b)
	require.NoError(t, outcome(t, equal), "an equal version is not older")
	require.Equal(t, map[key]string{k("k"): "five again"}, s.Rows())
}

func TestWithTheGuardASetNeverJoinsABatchThatDeletesItsKey(t *testing.T) {
	s := newSink()
	var refused []string
	cfg := guarded(config(), &refused)
	cfg.Interval = time.Hour
	b := start(t, cfg, s)

	enqueue(t, b, set("a", 1, "a"))
	enqueue(t, b, del("k", 2))
	again := enqueue(t, b, set("k", 3, "back"))
	closeBuffer(t, b)

	calls := s.Calls()
	require.Len(t, calls, 2, "the set went in the next batch")
	require.Equal(t, []sent{{k("a"), 1, "a", false}, {k("k"), 2, "", true}}, calls[0].writes)
	require.Equal(t, []sent{{k("k"), 3, "back", false}}, calls[1].writes)
	require.NoError(t, outcome(t, again))
	require.Equal(t, map[key]string{k("a"): "a", k("k"): "back"}, s.Rows())
	require.Empty(t, refused)
}

func TestDeleteBeforeTellsWhetherABufferedDeleteComesBeforeTheNewestWrite(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	var refused []string
	b := start(t, guarded(config(), &refused), s)

	enqueue(t, b, set("other", 1, "x"))
	s.nextCall(t) // held, so that what follows stays buffered
	require.False(t, b.DeleteBefore("t", "k"), "nothing buffered")
	enqueue(t, b, set("k", 1, "one"))
	require.False(t, b.DeleteBefore("t", "k"))
	deleted := enqueue(t, b, del("k", 2))
	require.False(t, b.DeleteBefore("t", "k"), "the delete is the newest write itself")
	enqueue(t, b, set("k", 3, "three")) // with the guard: the next batch
	require.True(t, b.DeleteBefore("t", "k"))
	enqueue(t, b, set("k", 4, "four"))
	require.True(t, b.DeleteBefore("t", "k"), "still behind the delete")
	require.False(t, b.DeleteBefore("t", "j"))
	require.False(t, b.DeleteBefore("u", "k"), "keys are per table")

	close(g)
	require.NoError(t, outcome(t, deleted))
	require.False(t, b.DeleteBefore("t", "k"), "the delete is durable, no longer buffered")
	closeBuffer(t, b)
	require.Equal(t, map[key]string{k("other"): "x", k("k"): "four"}, s.Rows())
}

// ---- Failures ----

func TestATransientFailureIsRetriedAndDeliversOnce(t *testing.T) {
	s := newSink().then(fail(writebuf.Transient))
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 2
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	require.NoError(t, outcome(t, ra), "what the failed attempt left on the write is not its outcome")
	require.NoError(t, outcome(t, rb))

	require.Equal(t, []int{2, 2}, s.Sizes())
	require.Equal(t, 1, s.Commits(k("a"), 1))
	require.Equal(t, 1, s.Commits(k("b"), 1))
	require.Equal(t, map[key]string{k("a"): "A", k("b"): "B"}, s.Rows())
}

func TestAPermanentFailureFailsTheBatchWithoutRetryingAndTheNextGoesOn(t *testing.T) {
	s := newSink().then(fail(writebuf.Permanent))
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 2
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	require.ErrorIs(t, outcome(t, ra), errPermanent)
	require.ErrorIs(t, outcome(t, rb), errPermanent)
	rc := enqueue(t, b, set("c", 1, "C"))
	closeBuffer(t, b)

	require.NoError(t, outcome(t, rc))
	require.Equal(t, []int{2, 1}, s.Sizes())
	require.Equal(t, map[key]string{k("c"): "C"}, s.Rows())
}

func TestARefusedWriteFailsAloneAndItsNeighboursCommit(t *testing.T) {
	s := newSink().then(refusing("b"))
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 3
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	rc := enqueue(t, b, set("c", 1, "C"))
	require.NoError(t, outcome(t, ra))
	require.ErrorIs(t, outcome(t, rb), errRefused)
	require.NoError(t, outcome(t, rc))
	require.Equal(t, []int{3}, s.Sizes(), "not retried")
	require.Equal(t, map[key]string{k("a"): "A", k("c"): "C"}, s.Rows())
}

func TestABatchTooLargeForTheServerIsHalvedDownToOneRecordAndEveryRecordLands(t *testing.T) {
	s := newSink().otherwise(func(_ int, b *writebuf.Batch) step {
		if b.Len() > 1 {
			return fail(writebuf.TooLarge)
		}
		return commit()
	})
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 8
	b := start(t, cfg, s)

	var results []*writebuf.Result
	for i := range 8 {
		table := "a"
		if i >= 5 {
			table = "b" // the halves split a table too, keeping its handle
		}
		results = append(results, enqueue(t, b, in(table, set(fmt.Sprint(i), 1, "v"))))
	}
	for _, r := range results {
		require.NoError(t, outcome(t, r))
	}

	require.Equal(t, []int{8, 4, 2, 1, 1, 2, 1, 1, 4, 2, 1, 1, 2, 1, 1}, s.Sizes())
	require.Len(t, s.Rows(), 8)
	for i := range 8 {
		table := "a"
		if i >= 5 {
			table = "b"
		}
		require.Equal(t, 1, s.Commits(key{table, fmt.Sprint(i)}, 1))
	}
}

func TestHalvingStopsAtTheSizeTheServerTakes(t *testing.T) {
	s := newSink().otherwise(func(_ int, b *writebuf.Batch) step {
		if b.Len() > 2 {
			return fail(writebuf.TooLarge)
		}
		return commit()
	})
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 8
	b := start(t, cfg, s)

	for i := range 8 {
		enqueue(t, b, set(fmt.Sprint(i), 1, "v"))
	}
	closeBuffer(t, b)
	require.Equal(t, []int{8, 4, 2, 2, 4, 2, 2}, s.Sizes())
	require.Len(t, s.Rows(), 8)
}

func TestASingleRecordTooLargeForTheServerIsRetried(t *testing.T) {
	s := newSink().then(fail(writebuf.TooLarge))
	b := start(t, config(), s)

	require.NoError(t, outcome(t, enqueue(t, b, set("a", 1, "A"))))
	require.Equal(t, []int{1, 1}, s.Sizes())
}

// ---- Lost commit replies ----

func TestALostCommitReplyThatCommittedSucceedsWithoutWritingAgain(t *testing.T) {
	st := lost(true)
	st.deny = refusing("b").deny // and Resolve tells of the refused row
	s := newSink().then(st)
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 2
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	require.NoError(t, outcome(t, ra))
	require.ErrorIs(t, outcome(t, rb), errRefused)

	require.Len(t, s.Calls(), 1, "not written again")
	require.Equal(t, 1, s.Resolves())
	require.Equal(t, map[key]string{k("a"): "A"}, s.Rows())
}

func TestALostCommitReplyThatDidNotCommitIsWrittenAgain(t *testing.T) {
	s := newSink().then(lost(false))
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 2
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	require.NoError(t, outcome(t, ra))
	require.NoError(t, outcome(t, rb))

	require.Equal(t, []int{2, 2}, s.Sizes())
	require.Equal(t, 1, s.Resolves())
	require.Equal(t, 1, s.Commits(k("a"), 1))
	require.Equal(t, map[key]string{k("a"): "A", k("b"): "B"}, s.Rows())
}

func TestAResolveThatFailsIsAskedAgainBeforeAnythingElseGoesOut(t *testing.T) {
	s := newSink().then(lost(false, cannotAsk, cannotAsk, truth))
	cfg := config()
	cfg.MaxBatch = 1
	b := start(t, cfg, s)

	ra := enqueue(t, b, set("a", 1, "A"))
	rb := enqueue(t, b, set("b", 1, "B"))
	require.NoError(t, outcome(t, ra))
	require.NoError(t, outcome(t, rb))

	// The sink notes it as a problem if a Write comes while a lost reply has
	// not been asked about.
	var order []string
	for _, c := range s.Calls() {
		order = append(order, c.ids()...)
	}
	require.Equal(t, []string{"a", "a", "b"}, order)
	require.Equal(t, 3, s.Resolves())
}

func TestALostCommitReplyThatCannotBeResolvedBeforeTheDeadlineFailsWithErrOutcomeUnknown(t *testing.T) {
	for _, tc := range []struct {
		name      string
		committed bool
		answer    answer
	}{
		{"it committed, the server cannot be asked", true, cannotAsk},
		{"it did not commit, the server cannot be asked", false, cannotAsk},
		{"asking the server hangs", true, hangThenFail},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSink().then(lost(tc.committed, tc.answer))
			cfg := config()
			cfg.RetryTimeout = retryTimeout
			b := start(t, cfg, s)

			accepted := time.Now()
			r := enqueue(t, b, set("a", 1, "A"))
			err := outcome(t, r)
			elapsed := time.Since(accepted)

			require.ErrorIs(t, err, writebuf.ErrOutcomeUnknown)
			require.ErrorIs(t, err, errLost, "the error tells what was lost")
			require.ErrorIs(t, err, errResolve, "and why it could not be found out")
			require.Less(t, elapsed, retryTimeout+minAttempt+slack)
			require.Len(t, s.Calls(), 1, "never written again: it might have committed")
			require.GreaterOrEqual(t, s.Resolves(), 1)
		})
	}
}

// ---- Deadlines ----

func TestWithTheServerFailingEveryWriteFailsWithinTheRetryTimeoutOfWhenItWasDue(t *testing.T) {
	for _, tc := range []struct {
		name     string
		interval time.Duration
		sink     step
	}{
		{"failing at once", 0, fail(writebuf.Transient)},
		{"hanging until the attempt times out", 0, hang(writebuf.Transient)},
		{"hanging, writes due after an interval", 30 * time.Millisecond, hang(writebuf.Transient)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSink().otherwise(func(int, *writebuf.Batch) step { return tc.sink })
			cfg := config()
			cfg.Interval = tc.interval
			cfg.MaxBatch = 2
			cfg.RetryTimeout = retryTimeout
			b := start(t, cfg, s)

			type write struct {
				due time.Time
				r   *writebuf.Result
			}
			var writes []write
			for i := range 6 {
				due := time.Now().Add(tc.interval) // a batch is due at latest this long after its first write
				writes = append(writes, write{due, enqueue(t, b, set(fmt.Sprint(i), 1, "v"))})
			}
			for i, w := range writes {
				err := outcome(t, w.r)
				late := time.Since(w.due)
				require.ErrorIs(t, err, errTransient, "write %d", i)
				require.NotErrorIs(t, err, writebuf.ErrOutcomeUnknown, "write %d", i)
				require.Less(t, late, retryTimeout+minAttempt+slack, "write %d failed this long after it was due", i)
			}
		})
	}
}

func TestAWriteQueuedBehindFailingBatchesFailsNearItsOwnDeadlineNotAfterTheirs(t *testing.T) {
	for _, tc := range []struct {
		name string
		sink step
	}{
		{"failing at once", fail(writebuf.Transient)},
		{"hanging until the attempt times out", hang(writebuf.Transient)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSink().otherwise(func(int, *writebuf.Batch) step { return tc.sink })
			cfg := config()
			cfg.MaxBatch = 1 // eight batches, each waiting behind the one before
			cfg.RetryTimeout = retryTimeout
			b := start(t, cfg, s)

			accepted := time.Now()
			var results []*writebuf.Result
			for i := range 8 {
				results = append(results, enqueue(t, b, set(fmt.Sprint(i), 1, "v")))
			}
			for i, r := range results {
				require.ErrorIs(t, outcome(t, r), errTransient, "write %d", i)
			}
			last := time.Since(accepted)

			require.Less(t, last, retryTimeout+minAttempt+slack, "about one retry timeout, not one per batch")
			require.Less(t, last, 3*retryTimeout)
		})
	}
}

// ---- Stats ----

func TestStatsCountFlushesDurableWritesRetriesAndFailuresByCause(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(
		gated(g, commit()),                        // held, so that the next two writes gather
		fail(writebuf.Transient), refusing("bad"), // a retry, then one refused and one durable
		fail(writebuf.Permanent), // a batch refused whole
		lost(false, cannotAsk),   // an outcome that cannot be learnt
	).otherwise(func(int, *writebuf.Batch) step { return fail(writebuf.Transient) })
	cfg := config()
	cfg.RetryTimeout = retryTimeout
	b := start(t, cfg, s)

	held := enqueue(t, b, set("held", 1, "1"))
	s.nextCall(t)
	first := []*writebuf.Result{enqueue(t, b, set("good", 1, "1")), enqueue(t, b, set("bad", 1, "1"))}
	close(g)
	require.NoError(t, outcome(t, held))
	require.NoError(t, outcome(t, first[0]))
	require.ErrorIs(t, outcome(t, first[1]), errRefused)
	require.ErrorIs(t, outcome(t, enqueue(t, b, set("p", 1, "1"))), errPermanent)
	require.ErrorIs(t, outcome(t, enqueue(t, b, set("u", 1, "1"))), writebuf.ErrOutcomeUnknown)
	require.ErrorIs(t, outcome(t, enqueue(t, b, set("late", 1, "1"))), errTransient) // until the retry timeout

	st := b.Stats()
	require.Equal(t, writebuf.Stats{
		Flushes: 5, Durable: 2, Refused: 2, Unknown: 1, TimedOut: 1,
		Retries: st.Retries, FlushTime: st.FlushTime, LastFlushTime: st.LastFlushTime,
	}, st)
	require.GreaterOrEqual(t, st.Retries, int64(2), "the first batch's second attempt, and the last batch's")
	require.Greater(t, st.FlushTime, st.LastFlushTime)
	require.Positive(t, st.LastFlushTime)

}

func TestStatsCountTheWritesThatCloseFails(t *testing.T) {
	cfg := config()
	cfg.Interval = time.Hour
	b := start(t, cfg, newSink())
	r := enqueue(t, b, set("k", 1, "1"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, b.Close(ctx), context.Canceled)
	require.ErrorIs(t, outcome(t, r), writebuf.ErrClosed)
	require.ErrorIs(t, b.Enqueue(context.Background(), set("after", 1, "1")).Wait(context.Background()), writebuf.ErrClosed)
	require.Equal(t, int64(1), b.Stats().Closed, "the write Close failed, not the one refused after")
}
