package pgstore_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestAKeySplitsAtItsFirstSlashIntoTableAndID(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)

	require.NoError(t, c.Set(ctx, "a/b/c", 7, "deep"))
	requireRecord(t, c, "a/b/c", 7, `"deep"`)

	version, val, found := storedRow(t, c, schema, "a", "b/c")
	require.True(t, found, `"a/b/c" is id "b/c" of table "a"`)
	require.Equal(t, int64(7), version)
	require.Equal(t, `"deep"`, val)
	require.EqualValues(t, 1, rowCount(t, c, schema, "a"))
	require.False(t, tableExists(t, c, schema, "b"))
}

func TestAKeyWithoutSlashGoesToTheDefaultTable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)

	require.NoError(t, c.Set(ctx, "lonely", 1, "alone"))
	_, val, found := storedRow(t, c, schema, pgstore.DefaultTable, "lonely")
	require.True(t, found)
	require.Equal(t, `"alone"`, val)
	// Both spellings name the same record.
	requireRecord(t, c, "default/lonely", 1, `"alone"`)
	require.NoError(t, c.Delete(ctx, "default/lonely"))
	requireNotFound(t, c, "lonely")
}

func TestWithDefaultTableChangesTheTableOfKeysWithoutSlash(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithDefaultTable("misc"))

	require.NoError(t, c.Set(ctx, "lonely", 1, "alone"))
	_, _, found := storedRow(t, c, schema, "misc", "lonely")
	require.True(t, found)
	require.False(t, tableExists(t, c, schema, pgstore.DefaultTable))
	requireRecord(t, c, "misc/lonely", 1, `"alone"`)
}

func TestMalformedKeysAreRefusedWithErrInvalidKeyNamingTheProblem(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, key string
		want      []string // fragments of the error message
	}{
		{"empty key", "", []string{"key is empty"}},
		{"empty table", "/x", []string{"table name", "empty"}},
		{"empty id", "x/", []string{"id", "empty"}},
		{"slash only", "/", []string{"table name", "empty"}},
		{"invalid UTF-8 in the id", "t/a\xffb", []string{"UTF-8"}},
		{"invalid UTF-8 in the table", "t\xc3/a", []string{"UTF-8"}},
		{"NUL byte in the id", "t/a\x00b", []string{"NUL"}},
		{"NUL byte in the table", "t\x00/a", []string{"NUL"}},
		{"NUL byte in a key without slash", "a\x00", []string{"NUL"}},
		{"table of 64 bytes", strings.Repeat("t", 64) + "/x", []string{"table name is 64 bytes", "63"}},
		{"id of MaxIDBytes+1 bytes", "t/" + strings.Repeat("i", pgstore.MaxIDBytes+1),
			[]string{fmt.Sprintf("id is %d bytes", pgstore.MaxIDBytes+1), fmt.Sprint(pgstore.MaxIDBytes)}},
	}
	c, schema := connectNamed(t)
	t.Run("each", func(t *testing.T) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				ctx := testCtx(t)
				errs := map[string]error{
					"Set":         c.Set(ctx, tc.key, 1, "v"),
					"SetAsync":    c.SetAsync(ctx, tc.key, 1, "v").Wait(ctx),
					"Delete":      c.Delete(ctx, tc.key),
					"DeleteAsync": c.DeleteAsync(ctx, tc.key).Wait(ctx),
				}
				_, errs["Get"] = c.Get(ctx, tc.key)
				for call, err := range errs {
					require.ErrorIs(t, err, pgstore.ErrInvalidKey, call)
					for _, frag := range tc.want {
						require.ErrorContains(t, err, frag, call)
					}
					require.Less(t, len(err.Error()), 300, "%s: the message quotes a long key shortened", call)
				}
			})
		}
	})
	require.Zero(t, queryInt(t, c, "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename NOT LIKE 'pgstore/%'", schema),
		"no malformed key may create a table")
}

func TestATableNameOf63BytesIsAccepted(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	table := strings.Repeat("t", 63)
	require.NoError(t, c.Set(ctx, table+"/x", 1, "v"))
	requireRecord(t, c, table+"/x", 1, `"v"`)
	require.True(t, tableExists(t, c, schema, table))
}

func TestLongTableNamesAreNeverTruncatedIntoOneTable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	prefix := strings.Repeat("n", 62)

	// PostgreSQL would cut both to the same 63 bytes: pgstore refuses both.
	for _, table := range []string{prefix + "ab", prefix + "ac", prefix + "a" + strings.Repeat("z", 40)} {
		err := c.Set(ctx, table+"/x", 1, table)
		require.ErrorIs(t, err, pgstore.ErrInvalidKey, "%d-byte table", len(table))
	}
	require.False(t, tableExists(t, c, schema, prefix+"a"))

	// Names of 63 bytes that differ in the last byte only are two tables.
	require.NoError(t, c.Set(ctx, prefix+"a/x", 1, "first"))
	require.NoError(t, c.Set(ctx, prefix+"b/x", 2, "second"))
	requireRecord(t, c, prefix+"a/x", 1, `"first"`)
	requireRecord(t, c, prefix+"b/x", 2, `"second"`)
	require.EqualValues(t, 1, rowCount(t, c, schema, prefix+"a"))
	require.EqualValues(t, 1, rowCount(t, c, schema, prefix+"b"))
}

func TestTheLongestIDIsStoredAndTheLimitIsPostgreSQLs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)

	// Random text does not compress, so the index must hold every byte.
	id := randomASCII(t, pgstore.MaxIDBytes)
	require.NoError(t, c.Set(ctx, "long/"+id, 1, "v"))
	requireRecord(t, c, "long/"+id, 1, `"v"`)
	_, _, found := storedRow(t, c, schema, "long", id)
	require.True(t, found)

	// One byte more is refused before it reaches the server...
	err := c.Set(ctx, "long/"+id+"x", 1, "v")
	require.ErrorIs(t, err, pgstore.ErrInvalidKey)

	// ...because the server's primary-key index would refuse such ids.
	_, err = c.Exec(ctx, "INSERT INTO "+ident(schema, "long")+" (id, version, val) VALUES ($1, 1, '1')", randomASCII(t, 3000))
	require.ErrorContains(t, err, "index row size")
	require.EqualValues(t, 1, rowCount(t, c, schema, "long"))
}

// specialKeys hold what naive SQL building breaks on.
var specialKeys = []string{
	"quotes/it's",
	`quotes/say "hi"`,
	`quotes/''`,
	`quotes/""`,
	"punct/a;b",
	"punct/a:b:c",
	"punct/:",
	"punct/100%",
	"punct/_%_",
	"punct/$1",
	"punct/?",
	"punct/--",
	"punct/*/",
	"spaces/ leading and trailing ",
	"spaces/tab\there\nnewline",
	`back/\`,
	`back/\\'\"`,
	`back/\x00`,
	"uni/😀",
	"uni/漢字",
	"uni/e\u0301",
	"uni/\u2028",
	"🚗/car",
	"漢字/表",
	"has space/in table",
	"it's/table",
	"Cars/upper",
	"cars/upper",
	"_cars/array type name of cars",
	"t/x' OR '1'='1",
	`t/x"; DROP TABLE t; --`,
	`t"; DROP SCHEMA x; --/id`,
	`t'); DROP TABLE t; --/id`,
	"'/'",
	`"/"`,
	`\/\`,
	"colon:table/a:b",
}

func TestKeysWithAnyCharactersRoundTripExactly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)

	for i, key := range specialKeys {
		require.NoError(t, c.Set(ctx, key, int64(i), map[string]any{"key": key}), "set %q", key)
	}
	tables := map[string]int64{}
	for i, key := range specialKeys {
		requireRecord(t, c, key, int64(i), jsonOf(t, map[string]any{"key": key}))
		table, id, _ := strings.Cut(key, "/")
		version, _, found := storedRow(t, c, schema, table, id)
		require.True(t, found, "key %q must be id %q of table %q", key, id, table)
		require.Equal(t, int64(i), version)
		tables[table]++
	}
	for table, n := range tables {
		require.Equal(t, n, rowCount(t, c, schema, table), "table %q", table)
	}
	require.EqualValues(t, len(tables),
		queryInt(t, c, "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename NOT LIKE 'pgstore/%'", schema), "one table per distinct name, no more")

	for _, key := range specialKeys {
		require.NoError(t, c.Delete(ctx, key), "delete %q", key)
		requireNotFound(t, c, key)
	}
	for table := range tables {
		require.Zero(t, rowCount(t, c, schema, table), "table %q", table)
	}
}

func TestAKeyHoldingSQLTouchesOnlyItsOwnRow(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	others := map[string]string{"t/a": `"A"`, "t/b": `"B"`, "t/c": `"C"`}
	for key, val := range others {
		require.NoError(t, c.Set(ctx, key, 1, []byte(val)))
	}
	requireOthersUntouched := func() {
		t.Helper()
		for key, val := range others {
			requireRecord(t, c, key, 1, val)
		}
	}

	for _, key := range []string{
		"t/x' OR '1'='1",
		`t/x" OR "1"="1`,
		`t/x"; DROP TABLE t; --`,
		"t/x'; DELETE FROM t; --",
		"t/a' --",
	} {
		requireNotFound(t, c, key) // a read matches no other row

		require.NoError(t, c.Set(ctx, key, 2, "mine"))
		require.EqualValues(t, 4, rowCount(t, c, schema, "t"), key)
		requireRecord(t, c, key, 2, `"mine"`)
		requireOthersUntouched()

		require.NoError(t, c.Delete(ctx, key))
		require.EqualValues(t, 3, rowCount(t, c, schema, "t"), key)
		requireNotFound(t, c, key)
		requireOthersUntouched()
	}

	// Table names, too, are only ever names.
	for _, table := range []string{
		`t"; DROP SCHEMA ` + pgx.Identifier{schema}.Sanitize() + ` CASCADE; --`,
		`t"; DROP TABLE "t"; --`,
		`t'; DROP TABLE t; --`,
	} {
		require.NoError(t, c.Set(ctx, table+"/id", 1, "v"), "table %q", table)
		requireRecord(t, c, table+"/id", 1, `"v"`)
		require.True(t, tableExists(t, c, schema, table), "table %q", table)
		require.NoError(t, c.Delete(ctx, table+"/id"))
		requireNotFound(t, c, table+"/id")
	}
	require.EqualValues(t, 3, rowCount(t, c, schema, "t"))
	requireOthersUntouched()
}

func TestTheLongestIDsAndTablesOfCharactersThatNeedEscapingAreWritten(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	// Every change is announced with the id and the table in JSON, where
	// these characters take up to six bytes each: no write may fail for it.
	var results []*pgstore.Result
	var keys []string
	for _, table := range []string{strings.Repeat("\x01", 63), strings.Repeat(`"`, 63), "plain"} {
		for _, char := range []string{"\x01", `"`, `\`, "\u2028", "é"} {
			id := strings.Repeat(char, pgstore.MaxIDBytes/len(char))
			keys = append(keys, table+"/"+id)
			results = append(results, c.SetAsync(ctx, table+"/"+id, 1, len(keys)))
		}
	}
	closeNow(t, c)
	waitAll(t, results)

	after := connectSchema(t, schema)
	for i, key := range keys {
		requireRecord(t, after, key, 1, fmt.Sprint(i+1))
	}
	require.NoError(t, after.Delete(ctx, keys[0]))
	requireNotFound(t, after, keys[0])
}

// deepstream built its batch as one SQL string: an id with ' failed the
// batch of every neighbour.
func TestIDsWithQuotesShareABatchWithOtherIDs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ids := []string{"plain", "it's", `"quoted"`, "x'; DROP TABLE q; --", `back\slash`, "semi;colon", "also plain"}
	// One batch: it goes out when its last id arrives.
	c, schema := connectNamed(t, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(len(ids)))
	var results []*pgstore.Result
	for i, id := range ids {
		results = append(results, c.SetAsync(ctx, "q/"+id, int64(i), id))
	}
	waitAll(t, results)
	for i, id := range ids {
		requireRecord(t, c, "q/"+id, int64(i), jsonOf(t, id))
	}
	require.EqualValues(t, len(ids), rowCount(t, c, schema, "q"))
}

// A table's primary-key index is a relation of the schema too: it must not
// take a name that a later table needs.
func TestATableMayBeNamedLikeAnotherTablesIndex(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	require.NoError(t, c.Set(ctx, "users/1", 1, 1))
	require.NoError(t, c.Set(ctx, "users_pkey/1", 1, 1))
	requireRecord(t, c, "users_pkey/1", 1, "1")
}

func TestADefaultTableHoldingASlashIsRefused(t *testing.T) {
	t.Parallel()
	_, err := pgstore.Connect(testCtx(t), pgtest.URL(t), pgstore.WithDefaultTable("a/b"))
	require.ErrorContains(t, err, "WithDefaultTable")
	require.ErrorContains(t, err, "holds a /")
}
