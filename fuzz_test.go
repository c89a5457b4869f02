package pgstore

// Fuzz targets of the package's parsers and validators. Their seed corpora are
// in testdata/fuzz/<FuzzName>; plain go test runs them, and
//
//	go test -run '^$' -fuzz '^FuzzSplitKey$' .
//
// explores further. FuzzCheckJSONB compares with PostgreSQL's jsonb when a
// server is found as the other tests find theirs (internal/pgtest); without
// one it checks the rest alone (and fails under CI=true). These tests run
// under the TestMain of package pgstore_test (main_test.go), the one of the
// test binary.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// ---- Keys and identifiers ----

// FuzzSplitKey checks splitKey and checkIdentifier against the rules of
// schema.go, written out here independently: a key is non-empty valid UTF-8
// without NUL; it splits at its first "/" into a table of 1 to 63 bytes and an
// id of 1 to MaxIDBytes bytes, or, without "/", is an id of the default
// table. Whatever the input, nothing panics; a split puts the key back
// together exactly, its table is a valid identifier without "/", and the
// explicit form table/id splits the same; an error wraps ErrInvalidKey, quotes
// the key through quoteInput and stays short for a long key.
func FuzzSplitKey(f *testing.F) {
	f.Fuzz(func(t *testing.T, key, defaultTable string) {
		checkIdentifierRules(t, "table", defaultTable)
		checkIdentifierRules(t, "schema", key)
		checkQuoteInput(t, key)

		// splitKey's callers pass a default table that WithDefaultTable
		// accepted; anything else stands for the default.
		if checkIdentifier("table", defaultTable) != nil || strings.Contains(defaultTable, "/") {
			defaultTable = DefaultTable
		}
		table, id, err := splitKey(key, defaultTable)

		wantTable, wantID, hasSlash := strings.Cut(key, "/")
		if !hasSlash {
			wantTable, wantID = defaultTable, key
		}
		valid := key != "" && utf8.ValidString(key) && !strings.Contains(key, "\x00") &&
			wantTable != "" && len(wantTable) <= maxIdentifierBytes &&
			wantID != "" && len(wantID) <= MaxIDBytes
		if !valid {
			if err == nil {
				t.Fatalf("splitKey(%q, %q) = %q, %q; want an error", key, defaultTable, table, id)
			}
			if !errors.Is(err, ErrInvalidKey) {
				t.Errorf("splitKey(%q) error %q does not wrap ErrInvalidKey", key, err)
			}
			if key != "" && !strings.Contains(err.Error(), quoteInput(key)) {
				t.Errorf("splitKey(%q) error %q does not quote the key", key, err)
			}
			if table != "" || id != "" {
				t.Errorf("splitKey(%q) failed but returned %q, %q", key, table, id)
			}
			if len(err.Error()) > 512 {
				t.Errorf("splitKey error for a %d-byte key is %d bytes long", len(key), len(err.Error()))
			}
			return
		}
		if err != nil {
			t.Fatalf("splitKey(%q, %q): %v; want %q, %q", key, defaultTable, err, wantTable, wantID)
		}
		if table != wantTable || id != wantID {
			t.Fatalf("splitKey(%q, %q) = %q, %q; want %q, %q", key, defaultTable, table, id, wantTable, wantID)
		}
		if hasSlash && table+"/"+id != key || !hasSlash && (table != defaultTable || id != key) {
			t.Fatalf("splitKey(%q) = %q, %q: does not reconstruct the key", key, table, id)
		}
		if strings.Contains(table, "/") {
			t.Fatalf("splitKey(%q): table %q holds a /", key, table)
		}
		if err := checkIdentifier("table", table); err != nil {
			t.Fatalf("splitKey(%q): table %q is no valid identifier: %v", key, table, err)
		}
		if !utf8.ValidString(id) || strings.Contains(id, "\x00") {
			t.Fatalf("splitKey(%q): id %q is not storable text", key, id)
		}
		// The explicit form of the key names the same record, whatever the
		// default table.
		if t2, id2, err := splitKey(table+"/"+id, "other"); err != nil || t2 != table || id2 != id {
			t.Fatalf("splitKey(%q) = %q, %q, %v; want %q, %q as for %q", table+"/"+id, t2, id2, err, table, id, key)
		}
	})
}

// checkIdentifierRules checks checkIdentifier against its rules: accepted
// exactly when non-empty valid UTF-8 without NUL of at most 63 bytes; an
// error names the kind and quotes the name.
func checkIdentifierRules(t *testing.T, kind, name string) {
	t.Helper()
	err := checkIdentifier(kind, name)
	valid := name != "" && utf8.ValidString(name) && !strings.Contains(name, "\x00") && len(name) <= maxIdentifierBytes
	switch {
	case valid && err != nil:
		t.Fatalf("checkIdentifier(%q, %q): %v; want nil", kind, name, err)
	case !valid && err == nil:
		t.Fatalf("checkIdentifier(%q, %q) = nil; want an error", kind, name)
	case err != nil:
		if !strings.HasPrefix(err.Error(), kind+" name ") {
			t.Errorf("checkIdentifier(%q, %q) error %q does not name the kind", kind, name, err)
		}
		if name != "" && !strings.Contains(err.Error(), quoteInput(name)) {
			t.Errorf("checkIdentifier(%q, %q) error %q does not quote the name", kind, name, err)
		}
	}
}

// checkQuoteInput checks that quoteInput quotes s, or a prefix of it that
// ends on a rune boundary and keeps nearly 80 bytes, with s's length.
func checkQuoteInput(t *testing.T, s string) {
	t.Helper()
	q := quoteInput(s)
	quoted, rest := q, ""
	if len(s) > 80 {
		suffix := "… (" + strconv.Itoa(len(s)) + " bytes)"
		var ok bool
		if quoted, ok = strings.CutSuffix(q, suffix); !ok {
			t.Fatalf("quoteInput of %d bytes = %q: no length", len(s), q)
		}
		rest = suffix
	}
	prefix, err := strconv.Unquote(quoted)
	if err != nil {
		t.Fatalf("quoteInput(%q) = %q: not a quoted string%s: %v", s, q, rest, err)
	}
	if !strings.HasPrefix(s, prefix) {
		t.Fatalf("quoteInput(%q) = %q: not a prefix of the input", s, q)
	}
	switch {
	case len(s) <= 80 && prefix != s:
		t.Fatalf("quoteInput(%q) = %q: shortened a short input", s, q)
	case len(s) > 80 && utf8.ValidString(s) && (len(prefix) < 80-utf8.UTFMax+1 || !utf8.ValidString(prefix)):
		t.Fatalf("quoteInput of %d bytes kept %q: not the first 80 bytes up to a rune boundary", len(s), prefix)
	}
}

// ---- JSON values ----

// FuzzCheckJSONB checks the validation of raw JSON values: checkJSONB never
// panics; encodeValue of json.RawMessage or []byte agrees with it within the
// size limit, copies the bytes, and refuses any value over it; what it accepts is JSON (not null) that also passes, decoded and
// marshalled again, through the marshalled path; a Go string is refused
// exactly when it holds NUL. With PostgreSQL, SELECT $1::text::jsonb accepts
// exactly what checkJSONB accepts, apart from JSON null (refused on purpose),
// the server's limits on numbers and nesting (see jsonbLimit), and JSON
// nested deeper than encoding/json's 10000 levels (refused by pgstore, taken
// by jsonb).
func FuzzCheckJSONB(f *testing.F) {
	conn := jsonbServer(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		err := checkJSONB(data, true)
		if err != nil && !errors.Is(err, ErrInvalidValue) {
			t.Fatalf("checkJSONB(%q) error %q does not wrap ErrInvalidValue", data, err)
		}
		for _, v := range []any{json.RawMessage(data), data} {
			out, encErr := encodeValue(v, len(data)+1)
			if errText(encErr) != errText(err) {
				t.Fatalf("encodeValue(%T %q): %v; checkJSONB: %v", v, data, encErr, err)
			}
			if encErr == nil && (!bytes.Equal(out, data) || len(out) > 0 && &out[0] == &data[0]) {
				t.Fatalf("encodeValue(%T %q) = %q: not a copy of the input", v, data, out)
			}
		}
		if len(data) > 0 {
			// Over the limit, a value is refused for its size whatever it holds.
			_, sizeErr := encodeValue(json.RawMessage(data), len(data)-1)
			if !errors.Is(sizeErr, ErrInvalidValue) || !strings.Contains(errText(sizeErr), "over the limit") {
				t.Fatalf("encodeValue of %d bytes with a limit of %d: %v", len(data), len(data)-1, sizeErr)
			}
		}
		if err == nil {
			if !json.Valid(data) || !utf8.Valid(data) || string(bytes.TrimSpace(data)) == "null" {
				t.Fatalf("checkJSONB accepted %q: not valid UTF-8 JSON, or null", data)
			}
			dec := json.NewDecoder(bytes.NewReader(data))
			dec.UseNumber()
			var v any
			if err := dec.Decode(&v); err != nil {
				t.Fatalf("checkJSONB accepted %q, which does not decode: %v", data, err)
			}
			if _, err := encodeValue(v, DefaultMaxValueBytes); err != nil {
				t.Fatalf("checkJSONB accepted %q, but not the same value marshalled: %v", data, err)
			}
		}

		out, strErr := encodeValue(string(data), DefaultMaxValueBytes)
		if hasNUL := bytes.IndexByte(data, 0) >= 0; (strErr != nil) != hasNUL {
			t.Fatalf("encodeValue(string %q): %v; a string should be refused exactly when it holds NUL", data, strErr)
		}
		if strErr == nil && utf8.Valid(data) {
			var back string
			if err := json.Unmarshal(out, &back); err != nil || back != string(data) {
				t.Fatalf("encodeValue(string %q) = %q, which decodes to %q, %v", data, out, back, err)
			}
		}

		if conn == nil {
			return
		}
		if strErr == nil {
			if typ, pgErr := jsonbType(t, conn, out); pgErr != nil || typ != "string" {
				t.Fatalf("jsonb refuses %q, encodeValue's JSON for a string: %v", out, pgErr)
			}
		}
		jsonbAgrees(t, conn, data, err)
	})
}

// jsonbAgrees fails the test unless PostgreSQL's jsonb accepts data exactly
// when checkJSONB did (its verdict: goErr).
func jsonbAgrees(t *testing.T, conn *pgx.Conn, data []byte, goErr error) {
	t.Helper()
	typ, pgErr := jsonbType(t, conn, data)
	switch {
	case pgErr == nil && typ == "null":
		if goErr == nil || !strings.Contains(goErr.Error(), "JSON null") {
			t.Fatalf("checkJSONB(%q): %v; want the refusal of JSON null", data, goErr)
		}
	case pgErr == nil && goErr != nil:
		if err := json.Unmarshal(data, new(json.RawMessage)); err != nil && strings.Contains(err.Error(), "exceeded max depth") {
			t.Logf("nested deeper than the 10000 levels of encoding/json, which jsonb takes: %.80q…", data)
			return
		}
		t.Fatalf("checkJSONB(%q) refuses what jsonb accepts: %v", data, goErr)
	case pgErr != nil && goErr == nil:
		if jsonbLimit(pgErr) {
			t.Logf("past a limit of jsonb, left to the server (a write past it fails alone at flush): %v", pgErr)
			return
		}
		t.Fatalf("checkJSONB(%q) accepts what jsonb refuses: %v", data, pgErr)
	}
}

// jsonbLimit reports whether PostgreSQL refused valid JSON for a limit of its
// own, which checkJSONB does not try to foresee: a number beyond numeric's
// range, or nesting beyond the server's stack. A record past it fails its own
// write when flushed (TestABadRecordFailsItsOwnWriteNotItsNeighbours).
func jsonbLimit(err *pgconn.PgError) bool {
	return err.Code == "22003" || strings.HasPrefix(err.Code, "54")
}

// jsonbType returns jsonb_typeof of data cast from text, or the server's
// refusal. Any other failure fails the test.
func jsonbType(t *testing.T, conn *pgx.Conn, data []byte) (string, *pgconn.PgError) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var typ string
	err := conn.QueryRow(ctx, "SELECT jsonb_typeof($1::text::jsonb)", string(data)).Scan(&typ)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if class := pgErr.Code[:2]; class != "22" && class != "54" {
			t.Fatalf("jsonb of %q: not a refusal of the data: %v", data, err)
		}
		return "", pgErr
	}
	if err != nil {
		t.Fatalf("jsonb of %q: %v", data, err)
	}
	return typ, nil
}

// jsonbServer connects to the test server for FuzzCheckJSONB, or returns nil
// without one (a failure under CI=true) or when its database is not UTF8,
// the only encoding in which jsonb takes every \u escape.
func jsonbServer(f *testing.F) *pgx.Conn {
	u, err := pgtest.Find()
	if err != nil {
		if os.Getenv("CI") == "true" {
			f.Fatal(err)
		}
		f.Logf("not comparing with PostgreSQL's jsonb: %v", err)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { conn.Close(context.Background()) })
	var encoding string
	if err := conn.QueryRow(ctx, "SHOW server_encoding").Scan(&encoding); err != nil {
		f.Fatal(err)
	}
	if encoding != "UTF8" {
		f.Logf("not comparing with PostgreSQL's jsonb: the database's encoding is %s, not UTF8", encoding)
		return nil
	}
	return conn
}

func errText(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// ---- Notification payloads ----

// FuzzParseNotice checks parseNotice: whatever the payload it never panics;
// a notice it accepts has a known type, a table, and one event per row (one
// for a table event), each of that type and table, keyed table/id; and
// encoded again as notifyFunctionSQL or notifyDDL would (ids inline or in
// base64), it parses into the same notice.
func FuzzParseNotice(f *testing.F) {
	f.Fuzz(func(t *testing.T, payload string) {
		nt, err := parseNotice(payload)
		if err != nil {
			if nt != nil {
				t.Fatalf("parseNotice(%q) failed (%v) but returned a notice", payload, err)
			}
			return
		}
		if nt.typ < CreateTable || nt.typ > Delete || payloadOps[nt.typ.payloadOp()] != nt.typ {
			t.Fatalf("parseNotice(%q): type %v", payload, nt.typ)
		}
		if nt.table == "" || strings.Contains(nt.table, "/") {
			t.Fatalf("parseNotice(%q): table %q, which no key could name", payload, nt.table)
		}
		tableEvent := nt.typ == CreateTable || nt.typ == DestroyTable
		if tableEvent && len(nt.events) != 1 {
			t.Fatalf("parseNotice(%q): %d events of a table event", payload, len(nt.events))
		}
		for _, e := range nt.events {
			if e.Type != nt.typ || e.Table != nt.table || e.Schema != "" {
				t.Fatalf("parseNotice(%q): event %+v of notice %v %q", payload, e, nt.typ, nt.table)
			}
			if tableEvent && (e.ID != "" || e.Key != "" || e.Version != 0) {
				t.Fatalf("parseNotice(%q): table event %+v has a record", payload, e)
			}
			if !tableEvent && (e.ID == "" || e.Key != e.Table+"/"+e.ID) {
				t.Fatalf("parseNotice(%q): key %q of table %q and id %q", payload, e.Key, e.Table, e.ID)
			}
		}
		for _, inline := range []bool{true, false} {
			again := encodeNotice(t, nt, inline)
			nt2, err := parseNotice(again)
			if err != nil {
				t.Fatalf("parseNotice(%q) = %+v, encoded again as %q, which fails: %v", payload, nt, again, err)
			}
			if nt2.typ != nt.typ || nt2.table != nt.table || len(nt2.events) != len(nt.events) {
				t.Fatalf("parseNotice(%q) = %+v, encoded again as %q: %+v", payload, nt, again, nt2)
			}
			for i := range nt.events {
				if !reflect.DeepEqual(nt2.events[i], nt.events[i]) {
					t.Fatalf("parseNotice(%q) event %d = %+v, encoded again as %q: %+v", payload, i, nt.events[i], again, nt2.events[i])
				}
			}
		}
	})
}

// encodeNotice writes a notice as pgstore's triggers and DDL do: a table
// event as notifyDDL, rows as notifyFunctionSQL, with each id inline or in
// base64 (always in base64 if it is not valid UTF-8, which no JSON string
// carries).
func encodeNotice(t *testing.T, nt *notice, inline bool) string {
	t.Helper()
	var payload any
	if nt.typ == CreateTable || nt.typ == DestroyTable {
		payload = struct {
			Op    string `json:"op"`
			Table string `json:"table"`
		}{nt.typ.payloadOp(), nt.table}
	} else {
		rows := make([][]any, 0, len(nt.events))
		for _, e := range nt.events {
			if inline && utf8.ValidString(e.ID) {
				rows = append(rows, []any{e.ID, e.Version})
			} else {
				rows = append(rows, []any{nil, e.Version, base64.StdEncoding.EncodeToString([]byte(e.ID))})
			}
		}
		payload = map[string]any{"op": nt.typ.payloadOp(), "table": nt.table, "rows": rows}
	}
	b, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// ---- Connection strings ----

// FuzzConnString checks connstring.go's helpers. On any string, nothing
// panics, an error of connStringError wraps the one it explains, and where
// pgx parses a keyword/value string connSetting reads its password, user and
// dbname as pgx did. On a well-formed string built from the inputs (as a URL
// with the password in the user info or the query, or as keyword/value with
// the password quoted, escaped or spaced), connSetting reads sslcert and
// sslkey back, and the error text of connStringError, on pgx's error and on a
// certificate-without-key error, does not depend on the password: with
// another password of the same shape it is the same text, so that no piece of
// the password shows in it.
func FuzzConnString(f *testing.F) {
	f.Setenv("PGSSLCERT", "")
	f.Setenv("PGSSLKEY", "")
	f.Fuzz(func(t *testing.T, raw, password, sslcert, sslkey string, form uint8) {
		checkConnStringHelpers(t, raw)

		if password == "" {
			return
		}
		cs := buildConnString(form, password, sslcert, sslkey)
		checkConnStringHelpers(t, cs)
		if got := connSetting(cs, "sslcert", "PGSSLCERT"); got != sslcert {
			t.Errorf("connSetting(%q, sslcert) = %q; want %q", cs, got, sslcert)
		}
		if got := connSetting(cs, "sslkey", "PGSSLKEY"); got != sslkey {
			t.Errorf("connSetting(%q, sslkey) = %q; want %q", cs, got, sslkey)
		}

		text := connStringErrorTexts(cs)
		if strings.Contains(password, "\x00") {
			// pgx refuses the whole string for the NUL, whatever else it holds.
			for _, s := range text {
				if strings.Contains(s, password) {
					t.Fatalf("the error for %q shows the password: %s", cs, s)
				}
			}
			return
		}
		other := otherPassword(password)
		if other == password {
			return // nothing but punctuation: no way to tell it from the text
		}
		cs2 := buildConnString(form, other, sslcert, sslkey)
		text2 := connStringErrorTexts(cs2)
		for i := range text {
			if text[i] != text2[i] {
				t.Fatalf("the error text depends on the password:\n%q\n\t-> %s\n%q\n\t-> %s", cs, text[i], cs2, text2[i])
			}
		}
	})
}

// checkConnStringHelpers runs connstring.go's helpers on s.
func checkConnStringHelpers(t *testing.T, s string) {
	t.Helper()
	connSetting(s, "sslcert", "PGSSLCERT")
	kv := keywordValues(s)
	for _, cause := range []error{errors.New(`both "sslcert" and "sslkey" are required`), errors.New("other")} {
		if err := connStringError(s, cause); !errors.Is(err, cause) || !strings.HasPrefix(err.Error(), "pgstore: ") {
			t.Fatalf("connStringError(%q, %q) = %q", s, cause, err)
		}
	}
	cfg, err := pgxpool.ParseConfig(s)
	if err != nil {
		if got := connStringError(s, err); !errors.Is(got, err) {
			t.Fatalf("connStringError(%q) = %q does not wrap %q", s, got, err)
		}
		return
	}
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		return
	}
	if _, ok := kv["service"]; ok {
		return // the service file's settings may take over
	}
	for key, got := range map[string]string{"password": cfg.ConnConfig.Password, "user": cfg.ConnConfig.User, "dbname": cfg.ConnConfig.Database} {
		if want, ok := kv[key]; ok && want != "" && got != want {
			t.Fatalf("keywordValues(%q) reads %s %q, pgx %q", s, key, want, got)
		}
	}
}

// connStringErrorTexts returns connStringError's text for pgx's error on cs
// (if pgx refuses it) and for a certificate without its key.
func connStringErrorTexts(cs string) []string {
	texts := []string{connStringError(cs, errors.New(`both "sslcert" and "sslkey" are required`)).Error()}
	if _, err := pgxpool.ParseConfig(cs); err != nil {
		texts = append(texts, connStringError(cs, err).Error())
	}
	return texts
}

// buildConnString writes a well-formed connection string with the password
// and, when not empty, sslcert and sslkey, in the form chosen by form.
func buildConnString(form uint8, password, sslcert, sslkey string) string {
	switch form % 5 {
	case 0, 1: // URL, the password in the user info or the query
		q := url.Values{}
		u := url.URL{Scheme: "postgres", User: url.UserPassword("u", password), Host: "127.0.0.1:5432", Path: "/db"}
		if form%5 == 1 {
			u.User = url.User("u")
			q.Set("password", password)
		}
		if sslcert != "" {
			q.Set("sslcert", sslcert)
		}
		if sslkey != "" {
			q.Set("sslkey", sslkey)
		}
		u.RawQuery = q.Encode()
		return u.String()
	default: // keyword/value, the password quoted, escaped, or quoted with spaces round "="
		quote := func(s string) string {
			return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
		}
		pw := quote(password)
		switch form % 5 {
		case 3:
			var b strings.Builder
			for _, c := range []byte(password) {
				if strings.IndexByte(` \'`+"\t\n\r\v\f", c) >= 0 {
					b.WriteByte('\\')
				}
				b.WriteByte(c)
			}
			pw = b.String()
		case 4:
			pw = " = " + pw
		}
		if form%5 != 4 {
			pw = "=" + pw
		}
		s := "host=127.0.0.1 user=u dbname=db password" + pw
		if sslcert != "" {
			s += " sslcert=" + quote(sslcert)
		}
		if sslkey != "" {
			s += " sslkey=" + quote(sslkey)
		}
		return s
	}
}

// otherPassword returns a password of the same shape as pw: its letters and
// digits changed, everything that could matter to a parser kept.
func otherPassword(pw string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r >= utf8.RuneSelf:
			if r == 'q' {
				return 'z'
			}
			return 'q'
		}
		return r
	}, pw)
}
