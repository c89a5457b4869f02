package mapbroker

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	code := m.Run()
	// A test that failed before its cleanup ran may leave its schema.
	testSchemas.Range(func(k, _ any) bool {
		if err := dropSchema(serverURL, k.(string)); err != nil {
			fmt.Fprintf(os.Stderr, "drop schema %s: %v\n", k, err)
			code = 1
		}
		return true
	})
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}
