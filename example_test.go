package pgstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
)

// The examples need a PostgreSQL server: the one named by
// PGSTORE_TEST_DATABASE_URL, or a local one. Each works in a schema of its
// own, dropped at its end.

func exampleDatabaseURL() string {
	if url := os.Getenv("PGSTORE_TEST_DATABASE_URL"); url != "" {
		return url
	}
	return "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
}

// exampleSchema drops what a previous run may have left in schema, and
// returns a function that drops the schema again.
func exampleSchema(schema string) (drop func()) {
	drop = func() {
		ctx := context.Background()
		conn, err := pgx.Connect(ctx, exampleDatabaseURL())
		if err != nil {
			log.Fatal(err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			log.Fatal(err)
		}
	}
	drop()
	return drop
}

type car struct {
	Model string `json:"model"`
	HP    int    `json:"hp"`
}

func ExampleConnect() {
	defer exampleSchema("pgstore_example_connect")()
	ctx := context.Background()

	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_connect"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx) // flushes every accepted write

	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Version, string(rec.Value))
	// Output:
	// 1 {"hp": 300, "model": "bmw"}
}

func ExampleNew() {
	defer exampleSchema("pgstore_example_new")()
	ctx := context.Background()

	pool, err := pgxpool.New(ctx, exampleDatabaseURL())
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	c, err := pgstore.New(ctx, pool, pgstore.WithSchema("pgstore_example_new"))
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	if err := c.Close(ctx); err != nil {
		log.Fatal(err)
	}

	// Close left the caller's pool open.
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pgstore_example_new.cars`).Scan(&n); err != nil {
		log.Fatal(err)
	}
	fmt.Println("records in cars:", n)
	// Output:
	// records in cars: 1
}

func ExampleConnector_Set() {
	defer exampleSchema("pgstore_example_set")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_set"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// "cars/bmw" is the record "bmw" of the table "cars", created on this
	// first write. Set returns once the record is durable.
	if err := c.Set(ctx, "cars/bmw", 1, map[string]any{"model": "bmw", "hp": 300}); err != nil {
		log.Fatal(err)
	}
	// A value may also be JSON text.
	if err := c.Set(ctx, "cars/vw", 1, []byte(`{"model": "vw", "hp": 90}`)); err != nil {
		log.Fatal(err)
	}
	// A value jsonb cannot hold is refused before it is buffered.
	err = c.Set(ctx, "cars/ghost", 1, nil)
	fmt.Println(errors.Is(err, pgstore.ErrInvalidValue))

	rows, err := c.Query(ctx, `SELECT id, val->>'hp' FROM pgstore_example_set.cars ORDER BY id`)
	if err != nil {
		log.Fatal(err)
	}
	for rows.Next() {
		var id, hp string
		if err := rows.Scan(&id, &hp); err != nil {
			log.Fatal(err)
		}
		fmt.Println(id, hp)
	}
	if err := rows.Err(); err != nil {
		log.Fatal(err)
	}
	// Output:
	// true
	// bmw 300
	// vw 90
}

func ExampleConnector_SetAsync() {
	defer exampleSchema("pgstore_example_setasync")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_setasync"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	// SetAsync accepts the writes in call order without waiting for them;
	// each Result reports when its write is durable, or why it failed.
	var results []*pgstore.Result
	for speed := 10; speed <= 50; speed += 10 {
		results = append(results, c.SetAsync("cars/bmw", int64(speed/10), map[string]int{"speed": speed}))
	}
	for _, res := range results {
		if err := res.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}

	// The last write wins.
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Version, string(rec.Value))
	// Output:
	// 5 {"speed": 50}
}

func ExampleResult_Wait() {
	defer exampleSchema("pgstore_example_wait")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_wait"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	res := c.SetAsync("cars/bmw", 1, car{Model: "bmw", HP: 300})
	// ... do other work while the write is flushed ...
	fmt.Println("durable:", res.Wait(ctx) == nil)

	// A write that is refused at once reports it through its Result too.
	res = c.SetAsync("/bmw", 1, car{Model: "bmw"})
	fmt.Println("invalid key:", errors.Is(res.Wait(ctx), pgstore.ErrInvalidKey))
	// Output:
	// durable: true
	// invalid key: true
}

func ExampleConnector_Get() {
	defer exampleSchema("pgstore_example_get")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_get"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 7, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	var bmw car
	if err := json.Unmarshal(rec.Value, &bmw); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("version %d: %s with %d hp\n", rec.Version, bmw.Model, bmw.HP)

	_, err = c.Get(ctx, "cars/trabant")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))
	// Output:
	// version 7: bmw with 300 hp
	// true
}

func ExampleConnector_Delete() {
	defer exampleSchema("pgstore_example_delete")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_delete"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"}); err != nil {
		log.Fatal(err)
	}
	if err := c.Delete(ctx, "cars/bmw"); err != nil {
		log.Fatal(err)
	}
	_, err = c.Get(ctx, "cars/bmw")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))

	// Deleting what is not there succeeds.
	fmt.Println(c.Delete(ctx, "cars/bmw"))
	// Output:
	// true
	// <nil>
}

func ExampleWithVersionGuard() {
	defer exampleSchema("pgstore_example_guard")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_guard"), pgstore.WithVersionGuard(true))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	if err := c.Set(ctx, "cars/bmw", 2, car{Model: "bmw", HP: 300}); err != nil {
		log.Fatal(err)
	}
	// A write of an older version is refused instead of overwriting newer data.
	err = c.Set(ctx, "cars/bmw", 1, car{Model: "bmw", HP: 90})
	fmt.Println(errors.Is(err, pgstore.ErrVersionConflict))
	// The same version again goes through, so retrying a write is harmless.
	fmt.Println(c.Set(ctx, "cars/bmw", 2, car{Model: "bmw", HP: 300}))

	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.Version, string(rec.Value))
	// Output:
	// true
	// <nil>
	// 2 {"hp": 300, "model": "bmw"}
}

func ExampleWithWriteInterval() {
	defer exampleSchema("pgstore_example_interval")()
	ctx := context.Background()
	url := exampleDatabaseURL()
	// Writes wait up to a second, so that quick updates of a record coalesce.
	c, err := pgstore.Connect(ctx, url,
		pgstore.WithSchema("pgstore_example_interval"), pgstore.WithWriteInterval(time.Second))
	if err != nil {
		log.Fatal(err)
	}
	for speed := 1; speed <= 60; speed++ {
		// Each Result could be waited for; Close below reports nothing lost.
		c.SetAsync("cars/bmw", int64(speed), map[string]int{"speed": speed})
	}
	// Reads see buffered writes.
	printSpeed(ctx, c, "buffered")
	// Close flushes every accepted write.
	if err := c.Close(ctx); err != nil {
		log.Fatal(err)
	}

	c, err = pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_example_interval"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)
	printSpeed(ctx, c, "stored")
	// Output:
	// buffered: version 60, speed 60
	// stored: version 60, speed 60
}

func printSpeed(ctx context.Context, c *pgstore.Connector, label string) {
	rec, err := c.Get(ctx, "cars/bmw")
	if err != nil {
		log.Fatal(err)
	}
	var v struct{ Speed int }
	if err := json.Unmarshal(rec.Value, &v); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s: version %d, speed %d\n", label, rec.Version, v.Speed)
}

func ExampleWithTablePolicy() {
	defer exampleSchema("pgstore_example_policy")()
	ctx := context.Background()
	errUnknownTable := errors.New("unknown table")
	allowed := map[string]bool{"cars": true, "users": true}
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(),
		pgstore.WithSchema("pgstore_example_policy"),
		pgstore.WithTablePolicy(func(table string) error {
			if !allowed[table] {
				return errUnknownTable
			}
			return nil
		}))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	fmt.Println(c.Set(ctx, "cars/bmw", 1, car{Model: "bmw"}))
	err = c.Set(ctx, "spam1234/x", 1, "y")
	fmt.Println(errors.Is(err, errUnknownTable))
	// Output:
	// <nil>
	// true
}
