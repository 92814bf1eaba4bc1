// Verdicts of the Go reference code on the cases tests/unit/test_tlog_reference.py generates:
// golang.org/x/mod/sumdb/note (Open, NewVerifier), github.com/transparency-dev/formats/log
// (Checkpoint.Unmarshal) and github.com/transparency-dev/merkle/proof (VerifyInclusion,
// VerifyConsistency with the RFC 6962 hasher), at the commits tlog_reference.json names.
//
// Reads the cases as JSON on stdin, writes {"verdicts": "1011...", "sizes": {case: size}} on
// stdout ("1" accepted; sizes of the checkpoints Unmarshal accepted).
//
// Regenerating, with Debian's Go 1.19 and no module proxy: make a module "goref" (go 1.19)
// holding this file as main.go and copies of the reference sources, imports rewritten to it:
// note/ <- x/mod sumdb/note/note.go; fmtlog/ <- formats log/checkpoint.go; merkle/ <- merkle
// hasher.go, with rfc6962/, proof/ and compact/ (proof/verify.go needs int min and max helpers
// under Go 1.19). Then:
//
//	python tests/unit/test_tlog_reference.py --cases > /tmp/cases.json
//	go run . < /tmp/cases.json > /tmp/verdicts.json
//
// and store the verdicts, sizes and the cases' sha256 in tlog_reference.json.
package main

import (
	"encoding/json"
	"os"
	"strings"

	fmtlog "goref/fmtlog"
	"goref/merkle/proof"
	"goref/merkle/rfc6962"
	"goref/note"
)

type testCase struct {
	Kind   string   `json:"kind"`
	Note   string   `json:"note"`
	Vkey   string   `json:"vkey"`
	Text   string   `json:"text"`
	Index  uint64   `json:"index"`
	Size   uint64   `json:"size"`
	Size2  uint64   `json:"size2"`
	Leaf   []byte   `json:"leaf"`
	Proof  [][]byte `json:"proof"`
	Root   []byte   `json:"root"`
	Root2  []byte   `json:"root2"`
}

func main() {
	var cases []testCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var verdicts strings.Builder
	sizes := map[int]uint64{}
	for i, c := range cases {
		ok := false
		switch c.Kind {
		case "note":
			v, err := note.NewVerifier(c.Vkey)
			if err != nil {
				panic(err)
			}
			_, err = note.Open([]byte(c.Note), note.VerifierList(v))
			ok = err == nil
		case "vkey":
			_, err := note.NewVerifier(c.Vkey)
			ok = err == nil
		case "checkpoint":
			var cp fmtlog.Checkpoint
			_, err := cp.Unmarshal([]byte(c.Text))
			ok = err == nil
			if ok {
				sizes[i] = cp.Size
			}
		case "inclusion":
			ok = proof.VerifyInclusion(rfc6962.DefaultHasher, c.Index, c.Size, c.Leaf, c.Proof, c.Root) == nil
		case "consistency":
			ok = proof.VerifyConsistency(rfc6962.DefaultHasher, c.Size, c.Size2, c.Proof, c.Root, c.Root2) == nil
		default:
			panic("unknown case kind " + c.Kind)
		}
		if ok {
			verdicts.WriteByte('1')
		} else {
			verdicts.WriteByte('0')
		}
	}
	out := map[string]interface{}{"verdicts": verdicts.String(), "sizes": sizes}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
