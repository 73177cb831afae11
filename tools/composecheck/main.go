// composecheck loads a Compose file as `docker compose config` does, with compose-go (the Compose
// specification's reference loader): schema, interpolation, profiles, references between services,
// then prints the resulting project as JSON. The deployment tests run it, since the machines that
// run them have no Docker. Usage: composecheck FILE [PROFILE...]
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: composecheck FILE [PROFILE...]")
		os.Exit(2)
	}
	options, err := cli.NewProjectOptions([]string{os.Args[1]}, cli.WithOsEnv, cli.WithProfiles(os.Args[2:]))
	if err == nil {
		var project any
		project, err = options.LoadProject(context.Background())
		if err == nil {
			err = json.NewEncoder(os.Stdout).Encode(project)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
