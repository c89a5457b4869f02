package writebuf_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore/internal/writebuf"
)

// The fake sink stands for PostgreSQL. It is scripted call by call, keeps
// what it "committed" in a map of rows, and notes every breach of the Sink
// contract it can see (two calls at once, a Write while a lost reply is not
// yet asked about, a malformed batch) as a problem for the test to report.

// Errors the fake sink gives. Each is wrapped, so that a test can tell which
// one a write got with errors.Is and never by identity.
var (
	errPermanent = errors.New("fake sink: permanent failure")
	errTransient = errors.New("fake sink: transient failure")
	errTooLarge  = errors.New("fake sink: statement timeout")
	errLost      = errors.New("fake sink: commit reply lost")
	errResolve   = errors.New("fake sink: cannot ask whether it committed")
	errRefused   = errors.New("fake sink: this row is refused")
	errStaleDB   = errors.New("fake sink: the row holds a newer version")
	errJunk      = errors.New("fake sink: left on a write by a failed attempt")
)

type key struct{ table, id string }

func (k key) String() string { return k.table + "/" + k.id }

type row struct {
	version int64
	value   string
}

// An answer is what Resolve says to one call.
type answer int

const (
	truth        answer = iota // whether the lost commit happened
	cannotAsk                  // an error at once
	hangThenFail               // an error once the context ends
)

// A step scripts one Write call.
type step struct {
	fail bool                   // the whole batch fails with kind; otherwise it commits
	kind writebuf.Failure       // what a failing call reports
	hang bool                   // a failing call first waits for its context to end
	gate <-chan struct{}        // wait for this to close (or the context to end) first
	deny func(int, string) bool // committing: refuse the write at this position, with this ID
	// Unknown only: whether the commit that lost its reply happened, and
	// what Resolve answers, call after call (the last answer repeats).
	committed bool
	answers   []answer
}

func commit() step                         { return step{} }
func fail(kind writebuf.Failure) step      { return step{fail: true, kind: kind} }
func hang(kind writebuf.Failure) step      { return step{fail: true, kind: kind, hang: true} }
func gated(g <-chan struct{}, s step) step { s.gate = g; return s }

// refusing commits the batch but refuses the writes to these IDs, as a
// server refuses a bad row and commits its neighbours.
func refusing(ids ...string) step {
	return step{deny: func(_ int, id string) bool { return slices.Contains(ids, id) }}
}

// refusingPositions commits the batch but refuses the writes whose position
// in it, modulo 8, is a bit of mask.
func refusingPositions(mask uint8) step {
	return step{deny: func(pos int, _ string) bool { return mask&(1<<(pos%8)) != 0 }}
}

// lost fails with Unknown: the commit was sent (and happened if committed)
// and its reply lost; Resolve then answers as told.
func lost(committed bool, answers ...answer) step {
	if len(answers) == 0 {
		answers = []answer{truth}
	}
	return step{fail: true, kind: writebuf.Unknown, committed: committed, answers: answers}
}

// A sent write, as the sink saw it.
type sent struct {
	key     key
	version int64
	value   string
	delete  bool
}

// A call is one Write the sink received.
type call struct {
	n      int
	writes []sent
}

func (c call) size() int { return len(c.writes) }

func (c call) ids() []string {
	var ids []string
	for _, w := range c.writes {
		ids = append(ids, w.key.id)
	}
	return ids
}

type fakeSink struct {
	guard    bool // refuse a set older than the row, as the server's guard does
	maxBatch int  // no batch may hold more writes

	active  atomic.Int32
	entered chan call // every Write, announced before it acts

	mu        sync.Mutex
	script    []step
	responder func(n int, b *writebuf.Batch) step // once the script is used up
	rows      map[key]row
	commits   map[key]map[int64]int
	calls     []call
	resolves  int
	problems  []string
	gates     []chan struct{}
	// The batch whose commit reply was lost, and what is known of it.
	lostBatch   *writebuf.Batch
	lostStep    step
	lostErrs    map[*writebuf.Write]error
	lostAsked   int
	needResolve bool
	onWrite     func(*writebuf.Batch) // runs in the flusher, before the call acts
}

func newSink() *fakeSink {
	return &fakeSink{
		entered: make(chan call, 4096),
		rows:    make(map[key]row),
		commits: make(map[key]map[int64]int),
	}
}

// then queues steps for the next Write calls.
func (s *fakeSink) then(steps ...step) *fakeSink {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.script = append(s.script, steps...)
	return s
}

// otherwise decides the calls that the script does not.
func (s *fakeSink) otherwise(f func(n int, b *writebuf.Batch) step) *fakeSink {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.responder = f
	return s
}

// newGate returns a gate for gated steps; release opens every gate.
func (s *fakeSink) newGate() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := make(chan struct{})
	s.gates = append(s.gates, g)
	return g
}

func (s *fakeSink) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.gates {
		select {
		case <-g:
		default:
			close(g)
		}
	}
}

func (s *fakeSink) problem(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.problemLocked(format, args...)
}

func (s *fakeSink) problemLocked(format string, args ...any) {
	s.problems = append(s.problems, fmt.Sprintf(format, args...))
}

func (s *fakeSink) enter(what string) {
	if n := s.active.Add(1); n != 1 {
		s.problem("%s while another sink call was in progress (%d at once)", what, n)
	}
}

func (s *fakeSink) Write(ctx context.Context, b *writebuf.Batch) (writebuf.Failure, error) {
	s.enter("Write")
	defer s.active.Add(-1)

	s.mu.Lock()
	n := len(s.calls) + 1
	if s.needResolve {
		s.problemLocked("Write %d while the batch whose reply was lost had not been asked about", n)
	}
	s.needResolve = false
	s.lostBatch = nil
	s.checkLocked(n, b)
	c := call{n: n}
	each(b, func(t *writebuf.Table, w *writebuf.Write) {
		c.writes = append(c.writes, sent{key{t.Name, w.ID}, w.Version, string(w.Value), w.Value == nil})
	})
	s.calls = append(s.calls, c)
	var st step
	switch {
	case len(s.script) > 0:
		st, s.script = s.script[0], s.script[1:]
	case s.responder != nil:
		st = s.responder(n, b)
	}
	hook := s.onWrite
	s.mu.Unlock()

	select {
	case s.entered <- c:
	default:
		s.problem("the test did not read the sink's calls")
	}
	if hook != nil {
		hook(b)
	}
	if st.gate != nil {
		select {
		case <-st.gate:
		case <-ctx.Done():
			return writebuf.Transient, fmt.Errorf("%w: call %d: %w", errTransient, n, ctx.Err())
		}
	}
	if !st.fail {
		errs := s.apply(b, st.deny)
		each(b, func(_ *writebuf.Table, w *writebuf.Write) { w.Err = errs[w] })
		return 0, nil
	}
	var cause error
	if st.hang {
		<-ctx.Done()
		cause = ctx.Err()
	}
	switch st.kind {
	case writebuf.Permanent:
		return st.kind, fmt.Errorf("%w: call %d: %v", errPermanent, n, cause)
	case writebuf.TooLarge:
		return st.kind, fmt.Errorf("%w: call %d: %v", errTooLarge, n, cause)
	case writebuf.Unknown:
		var errs map[*writebuf.Write]error
		if st.committed {
			errs = s.apply(b, st.deny)
		}
		s.mu.Lock()
		s.needResolve = true
		s.lostBatch, s.lostStep, s.lostErrs, s.lostAsked = b, st, errs, 0
		s.mu.Unlock()
		return st.kind, fmt.Errorf("%w: call %d: %v", errLost, n, cause)
	default:
		// What a failed attempt leaves on writes must not outlive it.
		each(b, func(_ *writebuf.Table, w *writebuf.Write) { w.Err = errJunk })
		return st.kind, fmt.Errorf("%w: call %d: %v", errTransient, n, cause)
	}
}

func (s *fakeSink) Resolve(ctx context.Context, b *writebuf.Batch) (bool, error) {
	s.enter("Resolve")
	defer s.active.Add(-1)

	s.mu.Lock()
	s.resolves++
	s.needResolve = false
	if s.lostBatch == nil || s.lostBatch != b {
		s.problemLocked("Resolve of a batch whose reply was not lost (or was already resolved)")
		s.mu.Unlock()
		return false, errResolve
	}
	st := s.lostStep
	ans := truth
	if len(st.answers) > 0 {
		ans = st.answers[min(s.lostAsked, len(st.answers)-1)]
	}
	s.lostAsked++
	s.mu.Unlock()

	switch ans {
	case cannotAsk:
		return false, fmt.Errorf("%w: at once", errResolve)
	case hangThenFail:
		<-ctx.Done()
		return false, fmt.Errorf("%w: %w", errResolve, ctx.Err())
	}
	if ctx.Err() != nil {
		return false, fmt.Errorf("%w: %w", errResolve, ctx.Err())
	}
	s.mu.Lock()
	errs := s.lostErrs
	s.lostBatch = nil
	s.mu.Unlock()
	if st.committed {
		each(b, func(_ *writebuf.Table, w *writebuf.Write) { w.Err = errs[w] })
	}
	return st.committed, nil
}

// apply commits a batch into the rows and says which writes were refused.
func (s *fakeSink) apply(b *writebuf.Batch, deny func(int, string) bool) map[*writebuf.Write]error {
	s.mu.Lock()
	defer s.mu.Unlock()
	errs := make(map[*writebuf.Write]error)
	pos := 0
	each(b, func(t *writebuf.Table, w *writebuf.Write) {
		defer func() { pos++ }()
		k := key{t.Name, w.ID}
		if deny != nil && deny(pos, w.ID) {
			errs[w] = fmt.Errorf("%w: %s@%d", errRefused, k, w.Version)
			return
		}
		if r, ok := s.rows[k]; s.guard && w.Value != nil && ok && r.version > w.Version {
			errs[w] = fmt.Errorf("%w: %s@%d < %d", errStaleDB, k, w.Version, r.version)
			return
		}
		if w.Value == nil {
			delete(s.rows, k)
		} else {
			s.rows[k] = row{w.Version, string(w.Value)}
		}
		if s.commits[k] == nil {
			s.commits[k] = make(map[int64]int)
		}
		s.commits[k][w.Version]++
	})
	return errs
}

// checkLocked notes what is wrong with the shape of a batch.
func (s *fakeSink) checkLocked(n int, b *writebuf.Batch) {
	count := 0
	for i, t := range b.Tables {
		if i > 0 && b.Tables[i-1].Name >= t.Name {
			s.problemLocked("call %d: tables out of order: %q before %q", n, b.Tables[i-1].Name, t.Name)
		}
		if len(t.Writes) == 0 {
			s.problemLocked("call %d: table %q has no writes", n, t.Name)
		}
		if t.Handle != handle(t.Name) {
			s.problemLocked("call %d: table %q has handle %v", n, t.Name, t.Handle)
		}
		seen := make(map[string]bool)
		for _, w := range t.Writes {
			if seen[w.ID] {
				s.problemLocked("call %d: %s/%s twice in one batch", n, t.Name, w.ID)
			}
			seen[w.ID] = true
			if w.Err != nil {
				s.problemLocked("call %d: %s/%s arrives with Err %v", n, t.Name, w.ID, w.Err)
			}
		}
		count += len(t.Writes)
	}
	if count != b.Len() || count == 0 {
		s.problemLocked("call %d: Len() is %d, the batch holds %d writes", n, b.Len(), count)
	}
	if s.maxBatch > 0 && count > s.maxBatch {
		s.problemLocked("call %d: %d writes, more than MaxBatch %d", n, count, s.maxBatch)
	}
}

// handle is the Handle the tests give every Op of a table.
func handle(table string) any { return "handle:" + table }

func each(b *writebuf.Batch, f func(*writebuf.Table, *writebuf.Write)) {
	for _, t := range b.Tables {
		for _, w := range t.Writes {
			f(t, w)
		}
	}
}

// ---- What the sink saw ----

func (s *fakeSink) Calls() []call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

func (s *fakeSink) Sizes() []int {
	var sizes []int
	for _, c := range s.Calls() {
		sizes = append(sizes, c.size())
	}
	return sizes
}

func (s *fakeSink) Resolves() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resolves
}

// Rows is the committed state: key to value.
func (s *fakeSink) Rows() map[key]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	rows := make(map[key]string, len(s.rows))
	for k, r := range s.rows {
		rows[k] = r.value
	}
	return rows
}

// Commits is how many times this version of this key was committed.
func (s *fakeSink) Commits(k key, version int64) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commits[k][version]
}

func (s *fakeSink) Problems() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.problems)
}

// nextCall waits for the sink's next Write.
func (s *fakeSink) nextCall(t *testing.T) call {
	t.Helper()
	select {
	case c := <-s.entered:
		return c
	case <-time.After(5 * time.Second):
		require.FailNow(t, "the sink was not called")
		return call{}
	}
}

// noCallFor asserts that the sink is not called for a while: the only way to
// see that something does not happen.
func (s *fakeSink) noCallFor(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case c := <-s.entered:
		require.FailNow(t, "the sink was called", "call %d with %v", c.n, c.ids())
	case <-time.After(d):
	}
}

func (s *fakeSink) describe() string {
	var b strings.Builder
	for _, c := range s.Calls() {
		fmt.Fprintf(&b, "call %d:", c.n)
		for _, w := range c.writes {
			fmt.Fprintf(&b, " %s@%d", w.key, w.version)
		}
		b.WriteString("\n")
	}
	return b.String()
}
