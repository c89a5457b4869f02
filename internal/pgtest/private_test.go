package pgtest_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestPrivateServerTakesTheSettingsAndStopsWithTheTest(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var u string
	t.Run("server", func(t *testing.T) {
		u = pgtest.Private(t, "max_connections=20", "application_name=it's private")
		conn, err := pgx.Connect(ctx, u)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		for name, want := range map[string]string{"max_connections": "20", "application_name": "it's private", "fsync": "off"} {
			var got string
			if err := conn.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("%s = %q, want %q", name, got, want)
			}
		}
		var user, db string
		if err := conn.QueryRow(ctx, "SELECT current_user, current_database()").Scan(&user, &db); err != nil {
			t.Fatal(err)
		}
		if user != "postgres" || db != "postgres" {
			t.Errorf("connected as %q to %q, want postgres to postgres", user, db)
		}
	})
	if u == "" {
		t.Skip("no private server")
	}
	conn, err := pgx.Connect(ctx, u)
	if err == nil {
		conn.Close(ctx)
		t.Fatal("the private server still answers after its test ended")
	}
}
