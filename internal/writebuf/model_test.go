package writebuf_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgstore/pgstore/internal/writebuf"
)

// A program is a random sequence of sets, deletes, reads, sink failures and
// pauses to settle, run against a Buffer over the fake sink and checked
// against a model: the rows the sink committed must be what the writes that
// reported success make, applied in the order they were enqueued. The
// property test draws programs from a seeded generator; FuzzBuffer decodes
// them from the fuzzer's bytes. Both go through decode, so a failing
// program is reported as the bytes that make it, ready to become a seed in
// testdata/fuzz/FuzzBuffer.

type opKind uint8

const (
	opSet      opKind = iota
	opDelete          // a delete
	opGet             // Lookup, compared to the model's newest accepted write
	opStaleSet        // a set older than the key's newest: the guard's case
	opScript          // the sink's next Write call does this
	opSettle          // wait for every outcome so far, then compare with the model
)

// A scripted failure (or refusal) of the sink's next Write call.
type scripted struct {
	what      uint8 // one of the script kinds below
	mask      uint8 // refusals: positions in the batch
	committed bool  // lost replies: whether the commit happened
}

const (
	scriptRefuse = iota
	scriptPermanent
	scriptTransient
	scriptTooLarge
	scriptLost             // Resolve tells the truth
	scriptLostAskedTwice   // Resolve fails once, then tells the truth
	scriptLostUnresolvable // Resolve fails until the deadline: ErrOutcomeUnknown
	scriptHangTransient    // the attempt hangs until its bound
	scriptKinds
)

func (s scripted) step() step {
	switch s.what {
	case scriptRefuse:
		return refusingPositions(s.mask)
	case scriptPermanent:
		return fail(writebuf.Permanent)
	case scriptTransient:
		return fail(writebuf.Transient)
	case scriptTooLarge:
		return fail(writebuf.TooLarge)
	case scriptLost, scriptLostAskedTwice, scriptLostUnresolvable:
		answers := map[uint8][]answer{
			scriptLost:             {truth},
			scriptLostAskedTwice:   {cannotAsk, truth},
			scriptLostUnresolvable: {cannotAsk},
		}[s.what]
		st := lost(s.committed, answers...)
		st.deny = refusingPositions(s.mask).deny
		return st
	default:
		return hang(writebuf.Transient)
	}
}

func (s scripted) String() string {
	name := [...]string{"refuse", "permanent", "transient", "too large", "lost", "lost, asked twice", "lost, unresolvable", "hang"}[s.what]
	switch s.what {
	case scriptRefuse:
		return fmt.Sprintf("%s %08b", name, s.mask)
	case scriptLost, scriptLostAskedTwice, scriptLostUnresolvable:
		return fmt.Sprintf("%s (committed %v, refusing %08b)", name, s.committed, s.mask)
	}
	return name
}

type progOp struct {
	kind   opKind
	key    int // into progKeys
	script scripted
}

type program struct {
	maxBatch   int
	interval   time.Duration
	limit      int
	guard      bool
	endedClose bool // Close with an ended context
	ops        []progOp
}

var progKeys = []key{{"a", "k0"}, {"a", "k1"}, {"a", "k2"}, {"b", "k0"}, {"b", "k1"}, {"c", "k9"}}

const (
	maxProgOps     = 64
	maxProgScripts = 6
	// Room for about two writes: writers wait, and the full buffer is
	// flushed early.
	tightLimit = 2 * (len("k0@64000") + writebuf.ResultOverhead + len("k0") + writebuf.KeyOverhead)
)

// decode makes a program of any bytes: a few for the configuration, then one
// for each operation (its low bits the kind, its high bits the key), and two
// more for a scripted failure.
func decode(data []byte) program {
	next := func() byte {
		if len(data) == 0 {
			return 0
		}
		b := data[0]
		data = data[1:]
		return b
	}
	p := program{
		maxBatch: 1 + int(next()%4),
		interval: time.Duration(next()%3) * time.Millisecond,
		limit:    1 << 20,
	}
	if next()%4 == 0 {
		p.limit = tightLimit
	}
	flags := next()
	p.guard = flags&1 != 0
	p.endedClose = flags&6 == 6
	scripts := 0
	for len(data) > 0 && len(p.ops) < maxProgOps {
		b := next()
		op := progOp{key: int(b>>4) % len(progKeys)}
		switch b % 16 {
		case 0, 1, 2, 3, 4, 14, 15:
			op.kind = opSet
		case 5, 6:
			op.kind = opDelete
		case 7, 8, 9:
			op.kind = opGet
		case 10:
			op.kind = opStaleSet
		case 11, 12:
			what, mask := next(), next()
			if scripts == maxProgScripts {
				op.kind = opGet
				break
			}
			scripts++
			op.kind = opScript
			op.script = scripted{what: what % scriptKinds, mask: mask, committed: what&0x80 != 0}
		case 13:
			op.kind = opSettle
		}
		p.ops = append(p.ops, op)
	}
	return p
}

func (p program) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "MaxBatch %d, Interval %v, Limit %d, Guard %v, Close with an ended context %v\n",
		p.maxBatch, p.interval, p.limit, p.guard, p.endedClose)
	for i, op := range p.ops {
		k := progKeys[op.key]
		switch op.kind {
		case opSet:
			fmt.Fprintf(&b, "%2d set %s\n", i, k)
		case opDelete:
			fmt.Fprintf(&b, "%2d delete %s\n", i, k)
		case opGet:
			fmt.Fprintf(&b, "%2d get %s\n", i, k)
		case opStaleSet:
			fmt.Fprintf(&b, "%2d stale set %s\n", i, k)
		case opScript:
			fmt.Fprintf(&b, "%2d sink: %v\n", i, op.script)
		case opSettle:
			fmt.Fprintf(&b, "%2d settle\n", i)
		}
	}
	return b.String()
}

// Times of programs: short, so that failures cost little.
const (
	progRetryTimeout = 80 * time.Millisecond
	progMinAttempt   = 10 * time.Millisecond
)

// An accepted write, as the model knows it.
type entry struct {
	i       int // order of enqueueing
	key     key
	version int64
	value   []byte // nil: a delete
	r       *writebuf.Result
}

// runProgram runs a program and returns what went wrong. It uses no
// testing.T, so that programs may run side by side.
func runProgram(p program) (problems []string, tally map[string]int) {
	tally = make(map[string]int)
	problem := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf(format, args...))
	}
	s := newSink()
	s.maxBatch, s.guard = p.maxBatch, p.guard
	var conflicts []string // Conflict runs in Enqueue, on this goroutine
	buf := writebuf.New(writebuf.Config{
		Interval:     p.interval,
		MaxBatch:     p.maxBatch,
		Limit:        p.limit,
		RetryTimeout: progRetryTimeout,
		MinAttempt:   progMinAttempt,
		Guard:        p.guard,
		Conflict: func(table, id string, version, _ int64) error {
			conflicts = append(conflicts, fmt.Sprintf("%s/%s@%d", table, id, version))
			return fmt.Errorf("%w: %s/%s@%d", errConflict, table, id, version)
		},
		Logger: quiet,
	}, s)
	closed := false
	defer func() {
		if !closed {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := buf.Close(ctx); err != nil {
				problem("closing after a failed check: %v", err)
			}
		}
	}()

	var accepted []*entry
	last := make(map[key]*entry)  // the newest accepted write of each key
	newest := make(map[key]int64) // the highest version given to each key
	stale := make(map[key]int64)  // how many stale versions each key was given
	scriptedKinds := make(map[uint8]bool)
	var seq int64

	enqueue := func(op writebuf.Op) *writebuf.Result {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return buf.Enqueue(ctx, op)
	}
	// settle waits for every outcome, then the buffer must be empty and the
	// sink's rows those of the model.
	settle := func(when string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, e := range accepted {
			if err := e.r.Wait(ctx); ctx.Err() != nil && errors.Is(err, ctx.Err()) {
				problem("%s: write %d (%s@%d) got no outcome", when, e.i, e.key, e.version)
				return false
			}
		}
		if st := buf.Stats(); st.Writes != 0 || st.Bytes != 0 {
			problem("%s: every outcome is in, yet %d writes and %d bytes are buffered", when, st.Writes, st.Bytes)
		}
		for _, k := range progKeys {
			if v, _, ok := buf.Lookup(k.table, k.id); ok {
				problem("%s: every outcome is in, yet Lookup(%s) finds version %d", when, k, v)
			}
		}
		compare(when, s, accepted, problem)
		return true
	}

	for i, op := range p.ops {
		k := progKeys[op.key]
		switch op.kind {
		case opSet, opDelete, opStaleSet:
			seq++
			version := seq * 1000
			isStale := op.kind == opStaleSet && newest[k] > 0
			if isStale {
				stale[k]++
				version = newest[k] - stale[k] // unique: never a multiple of 1000
			} else {
				newest[k] = version
			}
			var value []byte
			if op.kind != opDelete {
				value = []byte(fmt.Sprintf("%s@%d", k.id, version))
			}
			prev := last[k]
			_, _, wasBuffered := buf.Lookup(k.table, k.id)
			r := enqueue(writebuf.Op{Table: k.table, Handle: handle(k.table), ID: k.id, Version: version, Value: value})
			if !r.Accepted() {
				err := r.Wait(context.Background())
				switch {
				case !isStale:
					problem("op %d: the newest write to %s was not accepted: %v", i, k, err)
				case !p.guard || !errors.Is(err, errConflict):
					problem("op %d: stale set of %s refused with %v", i, k, err)
				case prev == nil || prev.value == nil || !wasBuffered:
					problem("op %d: stale set of %s refused though no newer set was buffered", i, k)
				case len(conflicts) == 0 || conflicts[len(conflicts)-1] != fmt.Sprintf("%s@%d", k, version):
					problem("op %d: Conflict was called with %v", i, conflicts)
				}
				continue
			}
			e := &entry{i: i, key: k, version: version, value: value, r: r}
			accepted = append(accepted, e)
			last[k] = e
		case opGet:
			prev := last[k]
			before := prev != nil && finished(prev.r)
			version, value, ok := buf.Lookup(k.table, k.id)
			switch {
			case ok && prev == nil:
				problem("op %d: Lookup(%s) found version %d of a key never written", i, k, version)
			case ok && before:
				problem("op %d: Lookup(%s) found version %d after its outcome was reported", i, k, version)
			case ok && (version != prev.version || (value == nil) != (prev.value == nil) || string(value) != string(prev.value)):
				problem("op %d: Lookup(%s) = %d %q, the newest write is %d %q", i, k, version, value, prev.version, prev.value)
			}
		case opScript:
			s.then(op.script.step())
			scriptedKinds[op.script.what] = true
		case opSettle:
			if !settle(fmt.Sprintf("op %d", i)) {
				return problems, tally
			}
		}
	}

	ctx := context.Background()
	if p.endedClose {
		ended, cancel := context.WithCancel(ctx)
		cancel()
		ctx = ended
	}
	closed = true
	if err := buf.Close(ctx); err != nil && !(p.endedClose && errors.Is(err, context.Canceled)) {
		problem("Close: %v", err)
	}
	ctx = context.Background() // every write has its outcome: Wait returns it
	for _, e := range accepted {
		if !finished(e.r) {
			problem("write %d (%s@%d) has no outcome after Close returned", e.i, e.key, e.version)
			return problems, tally
		}
	}
	if r := enqueue(writebuf.Op{Table: "a", Handle: handle("a"), ID: "late", Version: 1, Value: []byte("x")}); r.Accepted() || !errors.Is(r.Wait(ctx), writebuf.ErrClosed) {
		problem("a write after Close: accepted %v, %v", r.Accepted(), r.Wait(ctx))
	}
	settle("after Close")

	// Every error is one the sink or the buffer gives for a reason the
	// program made.
	lostScripted := scriptedKinds[scriptLost] || scriptedKinds[scriptLostAskedTwice] || scriptedKinds[scriptLostUnresolvable]
	for _, e := range accepted {
		err := e.r.Wait(ctx)
		switch {
		case err == nil, errors.Is(err, errStaleDB) && p.guard:
		case errors.Is(err, writebuf.ErrClosed):
			if !p.endedClose {
				problem("write %d (%s@%d): ErrClosed, yet Close's context never ended: %v", e.i, e.key, e.version, err)
			}
			if errors.Is(err, writebuf.ErrOutcomeUnknown) {
				problem("write %d (%s@%d): both ErrClosed and ErrOutcomeUnknown: %v", e.i, e.key, e.version, err)
			}
		case errors.Is(err, writebuf.ErrOutcomeUnknown):
			if !lostScripted {
				problem("write %d (%s@%d): ErrOutcomeUnknown, yet no reply was lost: %v", e.i, e.key, e.version, err)
			}
		case len(scriptedKinds) == 0:
			problem("write %d (%s@%d) failed, yet the sink never failed: %v", e.i, e.key, e.version, err)
		case errors.Is(err, errResolve) && lostScripted:
			// Queued behind a batch whose outcome could not be learned,
			// its deadline passed: failed with that cause, never sent.
		case !errors.Is(err, errPermanent) && !errors.Is(err, errTransient) && !errors.Is(err, errTooLarge) &&
			!errors.Is(err, errLost) && !errors.Is(err, errRefused):
			problem("write %d (%s@%d): unexpected error %v", e.i, e.key, e.version, err)
		}
	}

	// What reached the sink: only enqueued writes, each key's in the order
	// enqueued, and nothing committed twice.
	byVersion := make(map[key]map[int64]*entry)
	for _, e := range accepted {
		if byVersion[e.key] == nil {
			byVersion[e.key] = make(map[int64]*entry)
		}
		byVersion[e.key][e.version] = e
	}
	sentLast := make(map[key]int)
	wasSent := make(map[*entry]bool)
	for _, c := range s.Calls() {
		for _, w := range c.writes {
			e := byVersion[w.key][w.version]
			switch {
			case e == nil:
				problem("call %d: %s@%d was never enqueued", c.n, w.key, w.version)
				continue
			case w.delete != (e.value == nil) || w.value != string(e.value):
				problem("call %d: %s@%d sent as %q (delete %v)", c.n, w.key, w.version, w.value, w.delete)
			}
			if prev, ok := sentLast[w.key]; ok && e.i < prev {
				problem("call %d: %s@%d (op %d) sent after op %d, a later write to the key", c.n, w.key, w.version, e.i, prev)
			}
			sentLast[w.key] = e.i
			wasSent[e] = true
		}
	}
	for _, e := range accepted {
		err := e.r.Wait(ctx)
		n := s.Commits(e.key, e.version)
		switch {
		case n > 1:
			problem("write %d (%s@%d) committed %d times", e.i, e.key, e.version, n)
		case err == nil && wasSent[e] && n != 1:
			problem("write %d (%s@%d) succeeded, yet the sink did not commit it", e.i, e.key, e.version)
		case err != nil && !errors.Is(err, writebuf.ErrOutcomeUnknown) && n != 0:
			problem("write %d (%s@%d) failed (%v), yet the sink committed it", e.i, e.key, e.version, err)
		}
	}
	for _, e := range accepted {
		tally[outcomeClass(e.r.Wait(ctx))]++
	}
	tally["refused by the guard"] += len(conflicts)
	problems = append(problems, s.Problems()...)
	return problems, tally
}

// outcomeClass names the kind of a write's outcome, for the tally.
func outcomeClass(err error) string {
	for _, c := range []struct {
		err  error
		name string
	}{
		{writebuf.ErrClosed, "ErrClosed"},
		{writebuf.ErrOutcomeUnknown, "ErrOutcomeUnknown"},
		{errRefused, "refused by the sink"},
		{errStaleDB, "refused by the server's guard"},
		{errPermanent, "permanent"},
		{errTooLarge, "too large"},
		{errLost, "lost reply, did not commit, then the deadline"},
		{errTransient, "transient"},
	} {
		if errors.Is(err, c.err) {
			return c.name
		}
	}
	if err == nil {
		return "committed"
	}
	return "other"
}

// compare checks the sink's rows against the model: the accepted writes
// that reported success (or whose outcome is unknown and did commit),
// applied in the order enqueued.
func compare(when string, s *fakeSink, accepted []*entry, problem func(string, ...any)) {
	model := make(map[key]string)
	for _, e := range accepted {
		err := e.r.Wait(context.Background())
		if err != nil && !(errors.Is(err, writebuf.ErrOutcomeUnknown) && s.Commits(e.key, e.version) > 0) {
			continue
		}
		if e.value == nil {
			delete(model, e.key)
		} else {
			model[e.key] = string(e.value)
		}
	}
	rows := s.Rows()
	if maps.Equal(model, rows) {
		return
	}
	var diff []string
	for _, k := range progKeys {
		m, inModel := model[k]
		r, inRows := rows[k]
		if m != r || inModel != inRows {
			diff = append(diff, fmt.Sprintf("%s: model %q (%v), sink %q (%v)", k, m, inModel, r, inRows))
		}
	}
	problem("%s: the sink's rows differ from the model's:\n  %s", when, strings.Join(diff, "\n  "))
}

// ---- The property test and the fuzz target ----

func TestRandomProgramsAgreeWithAModel(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if env := os.Getenv("WRITEBUF_SEED"); env != "" {
		var err error
		seed, err = strconv.ParseUint(env, 10, 64)
		if err != nil {
			t.Fatalf("WRITEBUF_SEED: %v", err)
		}
	}
	t.Logf("seed %d (WRITEBUF_SEED=%d repeats the programs, if not their timing)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	programs := 120
	if testing.Short() {
		programs = 32
	}

	inputs := make([][]byte, programs)
	for i := range inputs {
		inputs[i] = make([]byte, 4+rng.IntN(60))
		for j := range inputs[i] {
			inputs[i][j] = byte(rng.Uint32())
		}
	}
	reports := make([][]string, programs)
	tallies := make([]map[string]int, programs)
	var wg sync.WaitGroup
	running := make(chan struct{}, 8) // programs mostly wait: run several at once
	for i, in := range inputs {
		wg.Add(1)
		running <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-running }()
			reports[i], tallies[i] = runProgram(decode(in))
		}()
	}
	wg.Wait()
	total := make(map[string]int)
	for _, tally := range tallies {
		for class, n := range tally {
			total[class] += n
		}
	}
	t.Logf("outcomes of %d programs: %v", programs, total)
	for i, report := range reports {
		if len(report) > 0 {
			t.Errorf("program %d, from the fuzz input %s:\n%v\n%s", i, corpusEntry(inputs[i]), decode(inputs[i]), strings.Join(report, "\n"))
		}
	}
}

// corpusEntry is a fuzz input as a file of testdata/fuzz/FuzzBuffer holds it.
func corpusEntry(data []byte) string {
	return fmt.Sprintf("go test fuzz v1\n[]byte(%q)", data)
}

func FuzzBuffer(f *testing.F) {
	for _, seed := range [][]byte{
		{},
		// MaxBatch 2, sets and deletes to a few keys, reads, a settle.
		{1, 0, 1, 0, 0x00, 0x10, 0x05, 0x07, 0x17, 0x20, 0x0d, 0x07, 0x15},
		// The guard, a stale set after a buffered set, a lost reply that
		// committed.
		{2, 1, 1, 1, 0x00, 0x0a, 0x07, 0x0b, 0x84, 0x00, 0x10, 0x0d, 0x07},
		// A tight limit, MaxBatch 4, a batch too large and a refusal.
		{3, 0, 0, 0, 0x0b, 0x03, 0x00, 0x00, 0x10, 0x20, 0x30, 0x0b, 0x00, 0x05, 0x40, 0x50, 0x0d},
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p := decode(data)
		if report, _ := runProgram(p); len(report) > 0 {
			t.Fatalf("%v\n%s", p, strings.Join(report, "\n"))
		}
	})
}
