package layers

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/tcpmigrate/tcpmigrate/"

// rules maps a package to the project packages it may import (by prefix;
// "internal/" allows every internal package). Packages not listed may
// import anything.
var rules = map[string][]string{
	"repair":    {},
	"firewall":  {},
	"transport": {"repair"},
	"source":    {"repair", "firewall", "transport", "internal/"},
	"target":    {"repair", "firewall", "transport", "internal/"},
}

// forbidden pairs never import each other, whatever else they do.
var forbidden = [][2]string{{"source", "target"}, {"target", "source"}}

// TestLayering fails when a package imports a project package the layout
// of DESIGN.md does not allow it to (test files excluded).
func TestLayering(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, module+"...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	checked := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(f[0], module)
		for _, imp := range f[1:] {
			dep, ok := strings.CutPrefix(imp, module)
			if !ok {
				continue
			}
			for _, fb := range forbidden {
				if pkg == fb[0] && dep == fb[1] {
					t.Errorf("%s imports %s", pkg, dep)
				}
			}
			allowed, ruled := rules[pkg]
			if !ruled {
				continue
			}
			checked++
			ok = false
			for _, a := range allowed {
				if dep == a || strings.HasSuffix(a, "/") && strings.HasPrefix(dep, a) {
					ok = true
				}
			}
			if !ok {
				t.Errorf("%s may not import %s (DESIGN.md: layout)", pkg, dep)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no project import was checked: the listing is wrong")
	}
}
