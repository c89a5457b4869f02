package pgstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// ---- Values ----

func TestAnyJSONMarshalableValueRoundTrips(t *testing.T) {
	t.Parallel()
	type car struct {
		Model string   `json:"model"`
		HP    int      `json:"hp"`
		Tags  []string `json:"tags,omitempty"`
		Owner *string  `json:"owner"`
	}
	cases := map[string]struct {
		value any
		want  string
	}{
		"struct":            {car{Model: "bmw", HP: 300, Tags: []string{"fast"}}, `{"model": "bmw", "hp": 300, "tags": ["fast"], "owner": null}`},
		"pointer to struct": {&car{Model: "vw"}, `{"model": "vw", "hp": 0, "owner": null}`},
		"map":               {map[string]any{"a": 1, "b": []any{true, nil, "x"}}, `{"a": 1, "b": [true, null, "x"]}`},
		"empty map":         {map[string]int{}, `{}`},
		"slice":             {[]int{3, 1, 2}, `[3, 1, 2]`},
		"empty slice":       {[]string{}, `[]`},
		"string":            {"hello", `"hello"`},
		"empty string":      {"", `""`},
		"HTML characters":   {"<a href='x'>&</a>", `"<a href='x'>&</a>"`},
		"unicode":           {"漢字 😀 e\u0301", `"漢字 😀 e\u0301"`},
		"integer":           {42, `42`},
		"negative float":    {-2.5, `-2.5`},
		"bool":              {false, `false`},
		"raw message":       {json.RawMessage(`{"z": 1, "a": [1, 2]}`), `{"a": [1, 2], "z": 1}`},
		"raw bytes":         {[]byte(` [ "spaced" ] `), `["spaced"]`},
		"raw big number":    {json.RawMessage(`1.5e300`), `1.5e300`},
	}
	c := connect(t)
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			key := "values/" + name
			require.NoError(t, c.Set(testCtx(t), key, 1, tc.value))
			requireRecord(t, c, key, 1, tc.want)
		})
	}
}

func TestLargeIntegersKeepEveryDigit(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	// float64 would turn this into ...976.
	const n = int64(1<<60 + 1)
	require.NoError(t, c.Set(ctx, "numbers/big", 1, map[string]int64{"n": n}))
	rec, err := c.Get(ctx, "numbers/big")
	require.NoError(t, err)
	var got struct{ N int64 }
	require.NoError(t, json.Unmarshal(rec.Value, &got))
	require.Equal(t, n, got.N)
}

func TestStoredValuesAreCopiesOfTheCallersBytes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))

	raw := json.RawMessage(`{"n": 1}`)
	bytesValue := []byte(`{"n": 1}`)
	results := []*pgstore.Result{c.SetAsync(ctx, "copy/raw", 1, raw), c.SetAsync(ctx, "copy/bytes", 1, bytesValue)}
	// The caller reuses its buffers while the writes wait in the buffer.
	copy(raw, `{"n": 2}`)
	copy(bytesValue, `{"n": 2}`)
	requireRecord(t, c, "copy/raw", 1, `{"n": 1}`)
	requireRecord(t, c, "copy/bytes", 1, `{"n": 1}`)

	// Nor may a reader change the buffered value through what Get returned.
	rec, err := c.Get(ctx, "copy/raw")
	require.NoError(t, err)
	copy(rec.Value, `{"n": 3}`)
	requireRecord(t, c, "copy/raw", 1, `{"n": 1}`)

	closeNow(t, c)
	waitAll(t, results)
	after := connectSchema(t, schema)
	requireRecord(t, after, "copy/raw", 1, `{"n": 1}`)
	requireRecord(t, after, "copy/bytes", 1, `{"n": 1}`)
}

func TestValuesThatJSONBCannotHoldAreRefusedWithErrInvalidValue(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		value any
		want  string // fragment of the error message
	}{
		{"nil", nil, "nil"},
		{"raw JSON null", json.RawMessage(`null`), "null"},
		{"raw bytes null with spaces", []byte(" null\n"), "null"},
		{"nil map, which marshals to null", map[string]int(nil), "null"},
		{"nil pointer, which marshals to null", (*struct{})(nil), "null"},
		{"invalid raw JSON", json.RawMessage(`{"a":`), "not valid JSON"},
		{"invalid raw bytes", []byte(`{'single': 'quotes'}`), "not valid JSON"},
		{"two raw JSON values", []byte(`1 2`), "not valid JSON"},
		{"empty raw message", json.RawMessage{}, "empty"},
		{"nil raw bytes", []byte(nil), "empty"},
		{"channel", make(chan int), "chan"},
		{"func", func() {}, "func"},
		{"NaN", math.NaN(), "NaN"},
		{"raw \\u0000 in a string", json.RawMessage(`{"a": "x\u0000y"}`), `\u0000`},
		{"Go string holding NUL", "x\x00y", `\u0000`},
		{"Go map key holding NUL", map[string]int{"k\x00": 1}, `\u0000`},
		{"lone high surrogate", json.RawMessage(`"\ud800"`), "surrogate"},
		{"high surrogate before text", json.RawMessage(`"\ud800abcdef"`), "surrogate"},
		{"lone low surrogate", json.RawMessage(`"\udc00"`), "surrogate"},
		{"surrogates in the wrong order", json.RawMessage(`"\ude00\ud83d"`), "surrogate"},
		{"invalid UTF-8 in raw JSON", []byte("\"\xff\""), "UTF-8"},
	}
	c, schema := connectNamed(t)
	t.Run("each", func(t *testing.T) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				ctx := testCtx(t)
				key := "bad/" + tc.name
				err := c.Set(ctx, key, 1, tc.value)
				require.ErrorIs(t, err, pgstore.ErrInvalidValue)
				require.ErrorContains(t, err, tc.want)
				err = c.SetAsync(ctx, key, 1, tc.value).Wait(ctx)
				require.ErrorIs(t, err, pgstore.ErrInvalidValue, "SetAsync reports it as well")
				requireNotFound(t, c, key)
			})
		}
	})
	require.False(t, tableExists(t, c, schema, "bad"), "no refused value may create a table")
}

func TestAValidSurrogatePairIsAccepted(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	require.NoError(t, c.Set(ctx, "emoji/grin", 1, json.RawMessage(`"\ud83d\ude00 and \\u0000 as text"`)))
	rec, err := c.Get(ctx, "emoji/grin")
	require.NoError(t, err)
	var s string
	require.NoError(t, json.Unmarshal(rec.Value, &s))
	require.Equal(t, `😀 and \u0000 as text`, s)
}

func TestTheVersionGuardRefusesNegativeVersions(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithVersionGuard(true))
	err := c.Set(ctx, "guard/neg", -1, "v")
	require.ErrorContains(t, err, "negative")
	require.Error(t, c.SetAsync(ctx, "guard/neg", -1, "v").Wait(ctx))
	require.False(t, tableExists(t, c, schema, "guard"))

	require.NoError(t, c.Set(ctx, "guard/neg", 0, "zero"), "0 is the lowest version allowed")
	requireRecord(t, c, "guard/neg", 0, `"zero"`)
}

// ---- Order of writes ----

func TestTheLastWriteToAKeyWinsWhateverItsVersion(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	t.Run("one after the other", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		c := connect(t)
		require.NoError(t, c.Set(ctx, "order/k", 5, "five"))
		require.NoError(t, c.Set(ctx, "order/k", 3, "three"))
		requireRecord(t, c, "order/k", 3, `"three"`)
	})
	t.Run("in one batch", func(t *testing.T) {
		t.Parallel()
		schema := pgtest.Schema(t)
		c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
		results := []*pgstore.Result{
			c.SetAsync(ctx, "order/k", 5, "five"),
			c.SetAsync(ctx, "order/k", 3, "three"),
		}
		requireRecord(t, c, "order/k", 3, `"three"`)
		closeNow(t, c)
		waitAll(t, results)
		requireRecord(t, connectSchema(t, schema), "order/k", 3, `"three"`)
	})
}

func TestADeleteRightAfterASetDeletes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	t.Run("group commit", func(t *testing.T) {
		t.Parallel()
		c, schema := connectNamed(t)
		require.NoError(t, c.Set(testCtx(t), "del/other", 1, "stays"))
		for i := range 20 {
			key := fmt.Sprintf("del/k%d", i)
			waitAll(t, []*pgstore.Result{c.SetAsync(ctx, key, 1, "gone"), c.DeleteAsync(ctx, key)})
			requireNotFound(t, c, key)
			_, _, found := storedRow(t, c, schema, "del", fmt.Sprintf("k%d", i))
			require.False(t, found, "the flush must not undo the delete of %q", key)
		}
		require.EqualValues(t, 1, rowCount(t, c, schema, "del"))
	})
	t.Run("coalesced over a stored record", func(t *testing.T) {
		t.Parallel()
		schema := pgtest.Schema(t)
		stored := connectSchema(t, schema)
		require.NoError(t, stored.Set(testCtx(t), "del/k", 1, "old"))

		c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
		results := []*pgstore.Result{c.SetAsync(ctx, "del/k", 2, "new"), c.DeleteAsync(ctx, "del/k")}
		requireNotFound(t, c, "del/k")
		closeNow(t, c)
		waitAll(t, results)
		requireNotFound(t, stored, "del/k")
		require.Zero(t, rowCount(t, stored, schema, "del"))
	})
}

// A node that only reads and deletes records of a table another node
// created learns once that the table exists, not on every flush.
func TestDeletesFromAnotherNodesTableLookItUpOnce(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	creator := connectSchema(t, schema)
	for _, key := range []string{"a/1", "a/2", "a/3", "b/1", "b/2"} {
		require.NoError(t, creator.Set(ctx, key, 1, key))
	}

	c, counter := connectCounted(t, pgtest.URL(t), schema)
	require.NoError(t, c.Delete(ctx, "a/1"))
	require.NoError(t, c.Delete(ctx, "a/2"))
	require.NoError(t, c.Delete(ctx, "a/3"))
	require.Equal(t, 1, counter.queriesWith("to_regclass"), "found once, then remembered")

	requireRecord(t, c, "b/1", 1, `"b/1"`) // a read finds the table too
	require.NoError(t, c.Delete(ctx, "b/1"))
	require.NoError(t, c.Delete(ctx, "nothing/1"))
	require.NoError(t, c.Delete(ctx, "nothing/2"))
	require.Equal(t, 3, counter.queriesWith("to_regclass"), "a missing table is looked up every time")

	require.EqualValues(t, 0, rowCount(t, creator, schema, "a"))
	require.EqualValues(t, 1, rowCount(t, creator, schema, "b"))
}

func TestASetRightAfterADeleteSets(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	stored := connectSchema(t, schema)
	require.NoError(t, stored.Set(testCtx(t), "del/k", 1, "old"))

	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	results := []*pgstore.Result{c.DeleteAsync(ctx, "del/k"), c.SetAsync(ctx, "del/k", 2, "new")}
	requireRecord(t, c, "del/k", 2, `"new"`)
	closeNow(t, c)
	waitAll(t, results)
	requireRecord(t, stored, "del/k", 2, `"new"`)

	require.NoError(t, stored.Delete(testCtx(t), "del/k"))
	require.NoError(t, stored.Set(testCtx(t), "del/k", 3, "again"))
	requireRecord(t, stored, "del/k", 3, `"again"`)
}

func TestGetSeesBufferedWrites(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))

	results := []*pgstore.Result{c.SetAsync(ctx, "buf/k", 1, "one")}
	requireRecord(t, c, "buf/k", 1, `"one"`)
	require.False(t, tableExists(t, c, schema, "buf"), "the write must still be buffered")

	results = append(results, c.SetAsync(ctx, "buf/k", 2, "two"))
	requireRecord(t, c, "buf/k", 2, `"two"`)
	results = append(results, c.DeleteAsync(ctx, "buf/k"))
	requireNotFound(t, c, "buf/k")
	results = append(results, c.SetAsync(ctx, "buf/k", 3, "three"))
	requireRecord(t, c, "buf/k", 3, `"three"`)
	require.False(t, tableExists(t, c, schema, "buf"))

	closeNow(t, c)
	waitAll(t, results)
	requireRecord(t, connectSchema(t, schema), "buf/k", 3, `"three"`)
}

func TestCloseFlushesEveryAcceptedWrite(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(64))
	const n = 1000
	var results []*pgstore.Result
	for i := range n {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("flush/%d", i), int64(i), map[string]int{"i": i}))
	}
	closeNow(t, c)
	waitAll(t, results)

	after := connectSchema(t, schema)
	require.EqualValues(t, n, rowCount(t, after, schema, "flush"))
	require.EqualValues(t, n, queryInt(t, after,
		"SELECT count(*) FROM "+ident(schema, "flush")+" WHERE id = version::text AND val = jsonb_build_object('i', version)"),
		"every record holds its own version and value")
}

func TestManyWritesToOneKeyCoalesceIntoOneRowWrite(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	require.NoError(t, setup.Set(ctx, "hot/seed", 1, "seed"))
	// Count every row the server writes to the table.
	for _, stmt := range []string{
		"CREATE TABLE " + ident(schema, "row_writes") + " (id text)",
		"CREATE FUNCTION " + ident(schema, "count_write") + "() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN INSERT INTO " +
			ident(schema, "row_writes") + " VALUES (NEW.id); RETURN NEW; END$$",
		"CREATE TRIGGER count_write AFTER INSERT OR UPDATE ON " + ident(schema, "hot") +
			" FOR EACH ROW EXECUTE FUNCTION " + ident(schema, "count_write") + "()",
	} {
		_, err := setup.Exec(ctx, stmt)
		require.NoError(t, err, stmt)
	}

	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	const n = 1000
	var results []*pgstore.Result
	for i := range n {
		results = append(results, c.SetAsync(ctx, "hot/k", int64(i), map[string]int{"i": i}))
	}
	closeNow(t, c)
	waitAll(t, results) // every coalesced write reports the outcome of the one written

	requireRecord(t, setup, "hot/k", n-1, fmt.Sprintf(`{"i": %d}`, n-1))
	require.EqualValues(t, 1, queryInt(t, setup, "SELECT count(*) FROM "+ident(schema, "row_writes")+" WHERE id = 'k'"),
		"%d writes to one key within the interval cost one row write", n)
}

// ---- Version guard ----

func TestTheVersionGuardRefusesAnOlderVersionAndKeepsTheRestOfTheBatch(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	stored := connectSchema(t, schema, pgstore.WithVersionGuard(true))
	require.NoError(t, stored.Set(ctx, "g/a", 10, "a10"))
	require.NoError(t, stored.Set(ctx, "g/b", 10, "b10"))
	require.NoError(t, stored.Set(ctx, "g/d", 10, "d10"))

	c := connectSchema(t, schema, pgstore.WithVersionGuard(true), pgstore.WithWriteInterval(time.Hour))
	older := c.SetAsync(ctx, "g/a", 5, "a5")
	others := []*pgstore.Result{
		c.SetAsync(ctx, "g/b", 11, "b11"),
		c.SetAsync(ctx, "g/c", 1, "c1"),
		c.SetAsync(ctx, "g/d", 10, "d10 again"), // an equal version goes through
	}
	closeNow(t, c)

	err := older.Wait(ctx)
	require.ErrorIs(t, err, pgstore.ErrVersionConflict)
	var conflict *pgstore.VersionConflictError
	require.ErrorAs(t, err, &conflict)
	require.Equal(t, pgstore.VersionConflictError{Key: "g/a", Version: 5, Stored: 10}, *conflict, "with the version that kept it out")
	require.ErrorContains(t, err, `"g/a" version 5 is older than version 10`)
	waitAll(t, others)
	requireRecord(t, stored, "g/a", 10, `"a10"`)
	requireRecord(t, stored, "g/b", 11, `"b11"`)
	requireRecord(t, stored, "g/c", 1, `"c1"`)
	requireRecord(t, stored, "g/d", 10, `"d10 again"`)
}

func TestTheVersionGuardAcceptsAnEqualVersionAndRefusesAnOlderOne(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithVersionGuard(true))
	require.NoError(t, c.Set(ctx, "g/k", 10, "first"))
	require.NoError(t, c.Set(ctx, "g/k", 10, "retried"))
	requireRecord(t, c, "g/k", 10, `"retried"`)

	require.ErrorIs(t, c.Set(ctx, "g/k", 9, "stale"), pgstore.ErrVersionConflict)
	requireRecord(t, c, "g/k", 10, `"retried"`)
	require.NoError(t, c.Set(ctx, "g/k", 11, "newer"))
	requireRecord(t, c, "g/k", 11, `"newer"`)
}

func TestTheVersionGuardRefusesAVersionOlderThanABufferedOneAtOnce(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithVersionGuard(true), pgstore.WithWriteInterval(time.Hour))
	newer := c.SetAsync(ctx, "g/k", 5, "five")

	// Nothing is flushed for an hour: only a refusal in the buffer itself
	// can complete this Result before ctx ends.
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	err := c.SetAsync(ctx, "g/k", 3, "three").Wait(ctx)
	var conflict *pgstore.VersionConflictError
	require.ErrorAs(t, err, &conflict)
	require.Equal(t, pgstore.VersionConflictError{Key: "g/k", Version: 3, Stored: 5}, *conflict, "the buffered version kept it out")
	requireRecord(t, c, "g/k", 5, `"five"`)

	closeNow(t, c)
	require.NoError(t, newer.Wait(testCtx(t)))
	requireRecord(t, connectSchema(t, schema), "g/k", 5, `"five"`)
}

func TestTheVersionGuardLetsARecordBeRecreatedAfterADelete(t *testing.T) {
	t.Parallel()
	t.Run("one after the other", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		c := connect(t, pgstore.WithVersionGuard(true))
		require.NoError(t, c.Set(ctx, "g/k", 10, "old"))
		require.NoError(t, c.Delete(ctx, "g/k"))
		require.NoError(t, c.Set(ctx, "g/k", 1, "recreated"))
		requireRecord(t, c, "g/k", 1, `"recreated"`)
	})
	t.Run("in one batch", func(t *testing.T) {
		t.Parallel()
		ctx := testCtx(t)
		schema := pgtest.Schema(t)
		stored := connectSchema(t, schema, pgstore.WithVersionGuard(true))
		require.NoError(t, stored.Set(ctx, "g/k", 10, "old"))

		c := connectSchema(t, schema, pgstore.WithVersionGuard(true), pgstore.WithWriteInterval(time.Hour))
		del := c.DeleteAsync(ctx, "g/k")
		set := c.SetAsync(ctx, "g/k", 1, "recreated")
		requireRecord(t, c, "g/k", 1, `"recreated"`)
		closeNow(t, c)
		require.NoError(t, del.Wait(ctx), "the delete")
		require.NoError(t, set.Wait(ctx), "the set after the delete")
		requireRecord(t, stored, "g/k", 1, `"recreated"`)
	})
}

// ---- Batches and the buffer limit ----

func TestAFullBatchIsFlushedWithoutWaitingForTheInterval(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(10))
	var results []*pgstore.Result
	for i := range 10 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("full/%d", i), int64(i), i))
	}
	// Only a flush of the full batch can complete these within the hour.
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	for i, r := range results {
		require.NoError(t, r.Wait(ctx), "write %d", i)
	}
	require.EqualValues(t, 10, rowCount(t, c, schema, "full"))
}

func TestAThousandWritesInBatchesOfTenAreAllCommitted(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithMaxBatchSize(10))
	var results []*pgstore.Result
	for i := range 1000 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("small/%d", i), int64(i), map[string]int{"i": i}))
	}
	waitAll(t, results)
	require.EqualValues(t, 1000, rowCount(t, c, schema, "small"))
	requireRecord(t, c, "small/999", 999, `{"i": 999}`)
}

func TestAFullBufferMakesWritersWaitAndIsFlushedEarly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	// An interval of an hour: only a full buffer makes anything flush.
	c := connectSchema(t, schema, pgstore.WithBufferLimit(4096), pgstore.WithWriteInterval(time.Hour))
	value := map[string]string{"pad": strings.Repeat("x", 1000)}

	// With a ctx that has already ended, Set returns at once either way: an
	// accepted write stays buffered (and Get finds it), a write that finds
	// the buffer full is not accepted.
	expired, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	accepted := map[string]int64{} // key: version
	refused := ""
	for i := 0; i < 100 && refused == ""; i++ {
		key := fmt.Sprintf("limit/%d", i)
		require.ErrorIs(t, c.Set(expired, key, int64(i), value), context.DeadlineExceeded)
		if _, err := c.Get(ctx, key); err == nil {
			accepted[key] = int64(i)
		} else {
			require.ErrorIs(t, err, pgstore.ErrNotFound)
			refused = key
		}
	}
	require.NotEmpty(t, accepted)
	require.NotEmpty(t, refused, "4 KiB must fill up with 1 KB values")

	// A writer that waits for room gets it: the full buffer is flushed
	// without waiting for the interval. 20 KB go through the 4 KiB buffer.
	var late []*pgstore.Result
	for i := range 20 {
		late = append(late, c.SetAsync(ctx, fmt.Sprintf("limit/late-%d", i), 1, value))
	}
	requireNotFound(t, c, refused)

	closeNow(t, c)
	waitAll(t, late)
	after := connectSchema(t, schema)
	for key, version := range accepted {
		requireRecord(t, after, key, version, jsonOf(t, value))
	}
	requireNotFound(t, after, refused)
	require.EqualValues(t, len(accepted)+20, rowCount(t, after, schema, "limit"))
}

func TestASmallBufferWithGroupCommitTakesEveryWrite(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithBufferLimit(4096))
	const n = 5000
	results := make([]*pgstore.Result, 0, n)
	for i := range n {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("tight/%d", i), int64(i), map[string]int{"i": i}))
	}
	waitAll(t, results)
	require.EqualValues(t, n, rowCount(t, c, schema, "tight"))
}

func TestAWriteLargerThanTheBufferLimitIsAcceptedIntoAnEmptyBuffer(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithBufferLimit(64))
	big := strings.Repeat("b", 10_000)
	require.NoError(t, c.Set(ctx, "huge/k", 1, big))
	requireRecord(t, c, "huge/k", 1, jsonOf(t, big))
}

// ---- Failures of single records ----

func TestABadRecordFailsItsOwnWriteNotItsNeighbours(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	// Valid JSON to Go, but beyond what jsonb's numeric can hold.
	bad := json.RawMessage(`{"n": 1e1000000}`)
	require.True(t, json.Valid(bad))
	_, err := setup.Exec(ctx, "SELECT $1::text::jsonb", string(bad))
	require.ErrorContains(t, err, "overflows numeric format", "the premise: PostgreSQL refuses this value")

	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	var good []*pgstore.Result
	for i := range 5 {
		good = append(good, c.SetAsync(ctx, fmt.Sprintf("n/good%d", i), int64(i), map[string]int{"n": i}))
	}
	badResult := c.SetAsync(ctx, "n/bad", 1, bad)
	for i := 5; i < 10; i++ {
		good = append(good, c.SetAsync(ctx, fmt.Sprintf("n/good%d", i), int64(i), map[string]int{"n": i}))
	}
	good = append(good, c.SetAsync(ctx, "other/x", 1, "neighbour table"), c.DeleteAsync(ctx, "n/never-there"))
	closeNow(t, c)

	err = badResult.Wait(ctx)
	require.ErrorIs(t, err, pgstore.ErrInvalidValue)
	require.ErrorContains(t, err, "overflows numeric format", "the server's reason")
	require.ErrorContains(t, err, "n/bad")
	waitAll(t, good)
	require.EqualValues(t, 10, rowCount(t, setup, schema, "n"))
	requireNotFound(t, setup, "n/bad")
	for i := range 10 {
		requireRecord(t, setup, fmt.Sprintf("n/good%d", i), int64(i), fmt.Sprintf(`{"n": %d}`, i))
	}
	requireRecord(t, setup, "other/x", 1, `"neighbour table"`)
}

// ---- Volume ----

func TestTwentyThousandAsyncWritesFromOneGoroutineAreAllCommitted(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	const n = 20_000
	start := time.Now()
	results := make([]*pgstore.Result, n)
	for i := range n {
		results[i] = c.SetAsync(ctx, fmt.Sprintf("bulk/%d", i), int64(i), map[string]int{"i": i})
	}
	waitAll(t, results)
	t.Logf("%d SetAsync calls committed in %v", n, time.Since(start))

	require.EqualValues(t, n, rowCount(t, c, schema, "bulk"))
	require.EqualValues(t, n*(n-1)/2, queryInt(t, c, "SELECT sum(version)::bigint FROM "+ident(schema, "bulk")))
}

// deepstream flushed concurrently, so an older value could land last.
func TestFlushesInOrderSoAStaleValueNeverWins(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	// Batches of one record: every write to the hot key is its own flush.
	c := connectSchema(t, schema, pgstore.WithMaxBatchSize(1))
	var results []*pgstore.Result
	for v := int64(1); v <= 300; v++ {
		results = append(results, c.SetAsync(ctx, "hot/k", v, v))
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("hot/other-%d", v), v, v))
	}
	waitAll(t, results)
	fresh := connectSchema(t, schema) // reads the table, not a buffer
	requireRecord(t, fresh, "hot/k", 300, "300")
}

func TestASetWhoseContextEndsAfterAcceptanceSaysTheWriteGoesOn(t *testing.T) {
	t.Parallel()
	c, schema := connectNamed(t, pgstore.WithWriteInterval(time.Hour))
	short, cancel := context.WithTimeout(testCtx(t), 50*time.Millisecond)
	defer cancel()
	err := c.Set(short, "t/k", 1, "v")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "accepted but not yet durable")
	closeNow(t, c)
	requireRecord(t, connectSchema(t, schema), "t/k", 1, `"v"`)
}

// ---- Large batches ----

// copyCounter is a pgx tracer that counts the COPYs into each table, and
// keeps the SQL of every query.
type copyCounter struct {
	mu      sync.Mutex
	copies  map[string]int
	queries []string
}

func (cc *copyCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	cc.queries = append(cc.queries, d.SQL)
	return ctx
}
func (cc *copyCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (cc *copyCounter) TraceCopyFromStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceCopyFromStartData) context.Context {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	cc.copies[d.TableName.Sanitize()]++
	return ctx
}
func (cc *copyCounter) TraceCopyFromEnd(context.Context, *pgx.Conn, pgx.TraceCopyFromEndData) {}

func (cc *copyCounter) staged() int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.copies[`"pg_temp"."pgstore_staging"`]
}

// queriesWith counts the queries whose SQL holds part.
func (cc *copyCounter) queriesWith(part string) int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	n := 0
	for _, q := range cc.queries {
		if strings.Contains(q, part) {
			n++
		}
	}
	return n
}

// stagingBegins counts the transactions that began by creating the staging
// table if missing.
func (cc *copyCounter) stagingBegins() int {
	return cc.queriesWith("CREATE TEMP TABLE IF NOT EXISTS pgstore_staging")
}

// connectCounted returns a connector whose pool of one connection counts
// the COPYs it runs, so that every batch runs on the same client connection.
func connectCounted(t *testing.T, connString, schema string, opts ...pgstore.Option) (*pgstore.Connector, *copyCounter) {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(connString)
	require.NoError(t, err)
	counter := &copyCounter{copies: make(map[string]int)}
	cfg.ConnConfig.Tracer = counter
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(testCtx(t), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	opts = append([]pgstore.Option{pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t))}, opts...)
	c, err := pgstore.New(testCtx(t), pool, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, c.Close(context.Background())) })
	return c, counter
}

func TestLargeBatchesAreCopiedAndLandWithTheirNeighbours(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	for i := range 10 {
		require.NoError(t, setup.Set(ctx, fmt.Sprintf("big/old%d", i), 1, "to be deleted"))
		require.NoError(t, setup.Set(ctx, fmt.Sprintf("big/k%05d", i), 1, "to be updated"))
	}

	// Ids differ between tables, so that a row left in the staging table
	// would show in the next table. One batch of exactly this many writes, flushed as soon as it is full.
	n := pgstore.StageMinRows + 10
	size := 2*n + 12
	c, counter := connectCounted(t, pgtest.URL(t), schema, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(size))
	var results []*pgstore.Result
	for i := range n {
		results = append(results,
			c.SetAsync(ctx, fmt.Sprintf("big/k%05d", i), 2, map[string]int{"big": i}),
			c.SetAsync(ctx, fmt.Sprintf("second/s%05d", i), 3, map[string]int{"second": i}))
	}
	for i := range 10 {
		results = append(results, c.DeleteAsync(ctx, fmt.Sprintf("big/old%d", i)))
	}
	results = append(results, c.SetAsync(ctx, "small/a", 1, "few"), c.SetAsync(ctx, "small/b", 1, "rows"))
	require.Len(t, results, size)
	waitAll(t, results)
	require.Equal(t, 1, len(counter.copies), "every COPY went into the staging table: %v", counter.copies)
	require.Equal(t, 2, counter.staged(), "one COPY for each table with enough rows")

	require.EqualValues(t, n, rowCount(t, setup, schema, "big"), "old rows deleted, updated rows counted once")
	require.EqualValues(t, n, rowCount(t, setup, schema, "second"), "nothing of the first table left in the staging table")
	require.EqualValues(t, 2, rowCount(t, setup, schema, "small"))
	for _, i := range []int{0, 9, n - 1} {
		requireRecord(t, setup, fmt.Sprintf("big/k%05d", i), 2, fmt.Sprintf(`{"big": %d}`, i))
		requireRecord(t, setup, fmt.Sprintf("second/s%05d", i), 3, fmt.Sprintf(`{"second": %d}`, i))
	}
	requireRecord(t, setup, "small/b", 1, `"rows"`)

	// The next batch, on the same server session, starts from an empty
	// staging table.
	results = results[:0]
	for i := range size {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("third/t%05d", i), 4, i))
	}
	waitAll(t, results)
	require.Equal(t, 3, counter.staged())
	require.EqualValues(t, size, rowCount(t, setup, schema, "third"))
}

func TestTheVersionGuardHoldsInACopiedBatch(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	for i := range 3 {
		require.NoError(t, setup.Set(ctx, fmt.Sprintf("g/k%05d", i), 10, "newer"))
	}

	c, counter := connectCounted(t, pgtest.URL(t), schema, pgstore.WithVersionGuard(true),
		pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(10*pgstore.StageMinRows))
	results := make([]*pgstore.Result, pgstore.StageMinRows)
	for i := range results {
		results[i] = c.SetAsync(ctx, fmt.Sprintf("g/k%05d", i), 5, "older")
	}
	closeNow(t, c)
	require.Equal(t, 1, counter.staged())
	for i, r := range results {
		if i < 3 {
			require.ErrorIs(t, r.Wait(ctx), pgstore.ErrVersionConflict, "write %d", i)
			requireRecord(t, setup, fmt.Sprintf("g/k%05d", i), 10, `"newer"`)
		} else {
			require.NoError(t, r.Wait(ctx), "write %d", i)
		}
	}
	requireRecord(t, setup, fmt.Sprintf("g/k%05d", pgstore.StageMinRows-1), 5, `"older"`)
}

func TestABadRecordInACopiedBatchFailsOnlyItself(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	c, counter := connectCounted(t, pgtest.URL(t), schema,
		pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(10*pgstore.StageMinRows))
	var good []*pgstore.Result
	for i := range pgstore.StageMinRows {
		good = append(good, c.SetAsync(ctx, fmt.Sprintf("n/k%05d", i), 1, i))
	}
	bad := c.SetAsync(ctx, "n/bad", 1, json.RawMessage(`{"n": 1e1000000}`)) // beyond jsonb's numeric
	closeNow(t, c)
	require.Equal(t, 1, counter.staged())

	err := bad.Wait(ctx)
	require.ErrorIs(t, err, pgstore.ErrInvalidValue)
	require.ErrorContains(t, err, "n/bad")
	waitAll(t, good)
	require.EqualValues(t, pgstore.StageMinRows, rowCount(t, setup, schema, "n"))
}

// A refusal for want of privilege while writing a table is that table's
// failure, not a sign that the role may not create the staging table: the
// next large batch is copied again.
func TestATableRefusedForPrivilegeDoesNotStopCopying(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	require.NoError(t, setup.Set(ctx, "guarded/x", 1, 1))
	refuse := ident(schema, "refuse")
	_, err := setup.Exec(ctx, "CREATE FUNCTION "+refuse+"() RETURNS trigger LANGUAGE plpgsql AS "+
		"$$ BEGIN RAISE EXCEPTION 'no writes here' USING ERRCODE = '42501'; END $$")
	require.NoError(t, err)
	_, err = setup.Exec(ctx, "CREATE TRIGGER refuse BEFORE INSERT ON "+ident(schema, "guarded")+" FOR EACH ROW EXECUTE FUNCTION "+refuse+"()")
	require.NoError(t, err)

	c, counter := connectCounted(t, pgtest.URL(t), schema,
		pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(pgstore.StageMinRows))
	for _, r := range setMany(ctx, c, "guarded", pgstore.StageMinRows) { // one full batch
		require.ErrorContains(t, r.Wait(ctx), "no writes here")
	}
	waitAll(t, setMany(ctx, c, "open", pgstore.StageMinRows))
	require.Equal(t, 2, counter.staged())
	require.EqualValues(t, pgstore.StageMinRows, rowCount(t, setup, schema, "open"))
}

// An emptied temporary table keeps its relfrozenxid, and autovacuum cannot
// freeze another session's: the staging table of a long-lived connection
// would hold back the freezing of the whole database. The connector gives
// it a new file from time to time. The test looks at the file, not at how
// new its relfrozenxid is, which any session's open transaction holds back:
// so it can run beside the others.
func TestTheStagingTableIsRenewedSoItDoesNotHoldBackFreezing(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	type file struct{ node, frozenAge int64 }
	// The staging table's file and the age of its relfrozenxid after a
	// batch, and again after a thousand transactions and another batch.
	// The connector's pool has one connection: pg_temp is its session's.
	files := func(c *pgstore.Connector) (before, after file) {
		staging := func() file {
			var f file
			rows, err := c.Query(ctx, "SELECT relfilenode::bigint, age(relfrozenxid)::bigint FROM pg_class WHERE oid = 'pg_temp.pgstore_staging'::regclass")
			require.NoError(t, err)
			require.True(t, rows.Next())
			require.NoError(t, rows.Scan(&f.node, &f.frozenAge))
			rows.Close()
			return f
		}
		waitAll(t, setMany(ctx, c, "first", pgstore.StageMinRows)) // one full batch
		before = staging()
		conn, err := pgx.Connect(ctx, pgtest.URL(t))
		require.NoError(t, err)
		defer conn.Close(ctx)
		for range 1000 {
			_, err := conn.Exec(ctx, "SELECT txid_current()") // one transaction id each
			require.NoError(t, err)
		}
		waitAll(t, setMany(ctx, c, "second", pgstore.StageMinRows))
		return before, staging()
	}
	opts := []pgstore.Option{pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(pgstore.StageMinRows)}

	kept, _ := connectCounted(t, pgtest.URL(t), pgtest.Schema(t), opts...)
	before, after := files(kept)
	require.Equal(t, before.node, after.node, "the premise: emptying at commit keeps the file")
	require.GreaterOrEqual(t, after.frozenAge, before.frozenAge+1000, "the premise: and its relfrozenxid falls behind")

	// A new file gets a relfrozenxid as new as the server's horizon allows
	// (which other sessions may hold back, so the age is not compared).
	renewed, counter := connectCounted(t, pgtest.URL(t), pgtest.Schema(t), append(opts, pgstore.WithStagingRenewal(0))...)
	before, after = files(renewed)
	require.NotEqual(t, before.node, after.node, "renewal gives the staging table a new file")
	require.Equal(t, 2, counter.staged())
}

// Two nodes updating the same records at once lock them in the same order
// (tables by name, ids in byte order), so neither waits for the other in a
// cycle: no deadlock, which the server would only break after a second.
// Each node writes the keys in the opposite order to the other, in batches
// of array upserts and of copied rows.
func TestNodesWritingTheSameKeysInOppositeOrdersDoNotDeadlock(t *testing.T) {
	t.Parallel()
	for _, n := range []int{500, pgstore.StageMinRows} {
		t.Run(fmt.Sprintf("%d records", n), func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			schema := pgtest.Schema(t)
			setup := connectSchema(t, schema)
			waitAll(t, append(setMany(ctx, setup, "a", n), setMany(ctx, setup, "b", n)...))

			var logs syncBuffer
			logger := pgstore.WithLogger(slog.New(slog.NewTextHandler(&logs, nil)))
			opts := []pgstore.Option{logger, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(2 * n)}
			nodes := []*pgstore.Connector{connectSchema(t, schema, opts...), connectSchema(t, schema, opts...)}
			for round := range 5 {
				var wg sync.WaitGroup
				for node, c := range nodes {
					wg.Go(func() {
						tables := []string{"a", "b"}
						if node == 1 {
							tables = []string{"b", "a"}
						}
						results := make([]*pgstore.Result, 0, 2*n)
						for i := range n {
							if node == 1 {
								i = n - 1 - i
							}
							for _, table := range tables {
								results = append(results, c.SetAsync(ctx, fmt.Sprintf("%s/%d", table, i), int64(round), node))
							}
						}
						for _, r := range results { // a full batch: flushed at once
							assert.NoError(t, r.Wait(ctx)) // not require: another goroutine
						}
					})
				}
				wg.Wait()
			}
			require.NotContains(t, logs.String(), "40P01", "a deadlock was detected")
			require.NotContains(t, logs.String(), "deadlock")
		})
	}
}

// ---- Limits, waits and the guard on reads ----

func TestAValueOverTheSizeLimitIsRefusedAtOnceNamingTheLimit(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithMaxValueBytes(1024))
	big := json.RawMessage(`"` + strings.Repeat("x", 1100) + `"`)
	err := c.Set(ctx, "big/k", 1, big)
	require.ErrorIs(t, err, pgstore.ErrInvalidValue)
	require.ErrorContains(t, err, "over the limit of 1024")
	require.NoError(t, c.Set(ctx, "big/k", 1, strings.Repeat("x", 1000)), "a value within the limit passes")
}

func TestSetAsyncsContextBoundsOnlyItsWaitForRoom(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	fp := newFailingPool(t)
	c := newOnPool(t, fp.pool, pgstore.WithBufferLimit(1), pgstore.WithRetryTimeout(20*time.Second))

	fp.failing.Store(true) // an outage: the buffer cannot drain
	accepted := c.SetAsync(ctx, "room/first", 1, "first")
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	refused := c.SetAsync(short, "room/second", 1, "second")
	err := refused.Wait(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded, "no room came before ctx ended")
	require.ErrorContains(t, err, "waiting for room")

	fp.failing.Store(false)
	require.NoError(t, accepted.Wait(ctx), "what was accepted goes on")
	requireRecord(t, c, "room/first", 1, `"first"`)
	requireNotFound(t, c, "room/second")
}

func TestWithTheGuardGetNeverShowsABufferedVersionOlderThanTheStoredOne(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	stored := connectSchema(t, schema, pgstore.WithVersionGuard(true))
	require.NoError(t, stored.Set(ctx, "g/k", 10, "ten"))

	c := connectSchema(t, schema, pgstore.WithVersionGuard(true), pgstore.WithWriteInterval(time.Hour))
	older := c.SetAsync(ctx, "g/k", 3, "three")
	requireRecord(t, c, "g/k", 10, `"ten"`)
	newer := c.SetAsync(ctx, "g/other", 3, "three")
	requireRecord(t, c, "g/other", 3, `"three"`) // nothing stored: the buffered one
	closeNow(t, c)
	require.ErrorIs(t, older.Wait(ctx), pgstore.ErrVersionConflict)
	require.NoError(t, newer.Wait(ctx))
}

func TestWritesAfterTheServerEndedAnIdleSessionSucceed(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["idle_session_timeout"] = "500ms"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	c := newOnPool(t, pool)
	require.NoError(t, c.Set(ctx, "idle/warm", 1, 1))
	for i := range 2 {
		// Longer than the server lets a session idle: it ends the pooled
		// connections with 57P05, which no write may fail for.
		time.Sleep(700 * time.Millisecond)
		require.NoError(t, c.Set(ctx, fmt.Sprintf("idle/%d", i), 1, i))
	}
}
