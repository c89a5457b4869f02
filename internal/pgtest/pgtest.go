// Package pgtest finds a PostgreSQL server for tests and gives each test a
// schema of its own, dropped when the test ends.
//
// The server is, in this order: the one named by PGSTORE_TEST_DATABASE_URL; a
// server at the local default address (postgres://postgres@127.0.0.1:5432/test);
// a postgres:16-alpine container started with testcontainers-go where Docker
// runs. Without any, tests are skipped with a message saying how to provide
// one, except when CI=true, where that is a failure.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/testcontainers/testcontainers-go/modules/postgres"
)

// EnvURL names the environment variable that points the tests at a server.
const EnvURL = "PGSTORE_TEST_DATABASE_URL"

// LocalURL is the local default address tried when EnvURL is not set.
const LocalURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

var (
	once     sync.Once
	foundURL string
	findErr  error
)

// URL returns the connection string of the test server, or skips (or, under
// CI=true, fails) the test when there is none.
func URL(t testing.TB) string {
	t.Helper()
	u, err := Find()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	return u
}

// Find returns the connection string of the test server, looking for one on
// the first call, or an error that says how to provide one.
func Find() (string, error) {
	once.Do(find)
	if findErr != nil {
		return "", fmt.Errorf("no PostgreSQL for the tests: %v. Set %s to a server's URL, run PostgreSQL at %s, or run Docker",
			findErr, EnvURL, LocalURL)
	}
	return foundURL, nil
}

func find() {
	if u := os.Getenv(EnvURL); u != "" {
		if err := ping(u); err != nil {
			findErr = fmt.Errorf("%s is set but the server does not answer: %w", EnvURL, err)
			return
		}
		foundURL = u
		return
	}
	localErr := ping(LocalURL)
	if localErr == nil {
		foundURL = LocalURL
		return
	}
	u, err := startContainer()
	if err != nil {
		findErr = fmt.Errorf("local server: %v; container: %v", localErr, err)
		return
	}
	foundURL = u
}

func ping(u string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return conn.Ping(ctx)
}

// startContainer runs a throwaway server. It is removed by testcontainers'
// reaper when the test process exits.
func startContainer() (u string, err error) {
	defer func() {
		// testcontainers panics when it finds no Docker at all.
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ctr, err := postgres.Run(ctx, "postgres:16-alpine",
		postgres.WithDatabase("test"), postgres.WithUsername("postgres"), postgres.WithPassword("postgres"),
		postgres.BasicWaitStrategies())
	if err != nil {
		return "", err
	}
	return ctr.ConnectionString(ctx, "sslmode=disable")
}

// Schema returns a new schema name, unique to the test, and drops the schema
// (with everything in it) when the test ends. The schema itself is not
// created.
func Schema(t testing.TB) string { return SchemaWithPrefix(t, "pgstore_test_") }

// SchemaWithPrefix is Schema, the name starting with prefix instead.
func SchemaWithPrefix(t testing.TB, prefix string) string {
	t.Helper()
	u := URL(t)
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	name := prefix + hex.EncodeToString(b[:])
	t.Cleanup(func() { DropSchema(t, u, name) })
	return name
}

// DropSchema drops a schema and all it holds, if it exists.
func DropSchema(t testing.TB, u, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, u)
	if err == nil {
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{name}.Sanitize()+" CASCADE")
	}
	if err != nil {
		t.Errorf("drop schema %q: %v", name, err)
	}
}

// Pool returns a pool on the test server, closed when the test ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), URL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}
