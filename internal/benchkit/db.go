package benchkit

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Open opens a pool on url, checks that the server answers and returns its
// version (server_version).
func Open(ctx context.Context, url string) (pool *pgxpool.Pool, version string, err error) {
	pool, err = pgxpool.New(ctx, url)
	if err != nil {
		return nil, "", err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, "", fmt.Errorf("connect: %w", err)
	}
	if err := pool.QueryRow(ctx, "SHOW server_version").Scan(&version); err != nil {
		pool.Close()
		return nil, "", err
	}
	return pool, version, nil
}

// SchemaName is prefix followed by eight random hex digits: the name of a
// run's own schemas.
func SchemaName(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:]) // crypto/rand's Read does not fail
	return prefix + hex.EncodeToString(b[:])
}

// DropSchemas drops the schemas with all they hold, reporting failures on
// stderr after name and a colon. It runs when a run ends, however it ends:
// with a context of its own, since the run's may be cancelled.
func DropSchemas(pool *pgxpool.Pool, name string, schemas ...string) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, s := range schemas {
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{s}.Sanitize()+" CASCADE"); err != nil {
			fmt.Fprintf(os.Stderr, "%s: drop schema %q: %v\n", name, s, err)
		}
	}
}
