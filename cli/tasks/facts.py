"""The `facts` family: short factual completions over five hand-written relations."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    """One relation: its sentence (with {subject} and {answer}), three shots and its table."""

    name: str
    sentence: str
    shots: tuple[tuple[str, str], ...]
    table: str


# Each table line reads `subject = answer | alias | ...`: the first answer is the reference shown,
# every alias is accepted too (compared after normalising, checks.py). Where a country has several
# official languages or capitals, each is accepted. A relation's three shots are never asked as its
# items.
CAPITALS = """
Afghanistan = Kabul
Albania = Tirana
Algeria = Algiers
Angola = Luanda
Argentina = Buenos Aires
Armenia = Yerevan
Australia = Canberra
Austria = Vienna
Azerbaijan = Baku
Bahrain = Manama
Bangladesh = Dhaka | Dacca
Belarus = Minsk
Belgium = Brussels
Bhutan = Thimphu
Bolivia = Sucre | La Paz
Bosnia and Herzegovina = Sarajevo
Botswana = Gaborone
Brazil = Brasília
Bulgaria = Sofia
Burkina Faso = Ouagadougou
Cambodia = Phnom Penh
Cameroon = Yaoundé
Canada = Ottawa
Chad = N'Djamena | Ndjamena
Chile = Santiago | Santiago de Chile
China = Beijing | Peking
Colombia = Bogotá
Costa Rica = San José
Croatia = Zagreb
Cuba = Havana
Cyprus = Nicosia
Czech Republic = Prague
Democratic Republic of the Congo = Kinshasa
Denmark = Copenhagen
Dominican Republic = Santo Domingo
Ecuador = Quito
Egypt = Cairo
El Salvador = San Salvador
Eritrea = Asmara
Estonia = Tallinn
Ethiopia = Addis Ababa
Fiji = Suva
Finland = Helsinki
France = Paris
Gabon = Libreville
Germany = Berlin
Ghana = Accra
Greece = Athens
Guatemala = Guatemala City
Guinea = Conakry
Haiti = Port-au-Prince
Honduras = Tegucigalpa
Hungary = Budapest
Iceland = Reykjavík
India = New Delhi | Delhi
Indonesia = Jakarta | Nusantara
Iran = Tehran | Teheran
Iraq = Baghdad
Ireland = Dublin
Jamaica = Kingston
Jordan = Amman
Kazakhstan = Astana | Nur-Sultan
Kuwait = Kuwait City
Kyrgyzstan = Bishkek
Laos = Vientiane
Latvia = Riga
Lebanon = Beirut
Liberia = Monrovia
Libya = Tripoli
Lithuania = Vilnius
Luxembourg = Luxembourg | Luxembourg City
Madagascar = Antananarivo
Malawi = Lilongwe
Malaysia = Kuala Lumpur
Mali = Bamako
Malta = Valletta
Mauritania = Nouakchott
Mexico = Mexico City
Moldova = Chișinău | Kishinev
Mongolia = Ulaanbaatar | Ulan Bator
Montenegro = Podgorica
Morocco = Rabat
Mozambique = Maputo
Myanmar = Naypyidaw | Nay Pyi Taw | Naypyitaw
Namibia = Windhoek
Nepal = Kathmandu
Netherlands = Amsterdam
New Zealand = Wellington
Nicaragua = Managua
Niger = Niamey
Nigeria = Abuja
North Korea = Pyongyang
North Macedonia = Skopje
Norway = Oslo
Oman = Muscat
Pakistan = Islamabad
Panama = Panama City
Papua New Guinea = Port Moresby
Paraguay = Asunción
Peru = Lima
Philippines = Manila
Poland = Warsaw
Portugal = Lisbon
Qatar = Doha
Romania = Bucharest
Russia = Moscow
Rwanda = Kigali
Saudi Arabia = Riyadh
Senegal = Dakar
Serbia = Belgrade
Sierra Leone = Freetown
Singapore = Singapore
Slovakia = Bratislava
Slovenia = Ljubljana
Somalia = Mogadishu
South Africa = Pretoria | Cape Town | Bloemfontein
South Korea = Seoul
Spain = Madrid
Sudan = Khartoum
Sweden = Stockholm
Switzerland = Bern | Berne
Syria = Damascus
Tajikistan = Dushanbe
Tanzania = Dodoma
Thailand = Bangkok
Togo = Lomé
Tunisia = Tunis
Turkey = Ankara
Turkmenistan = Ashgabat
Uganda = Kampala
Ukraine = Kyiv | Kiev
United Kingdom = London
United States = Washington, D.C. | Washington | Washington DC
Uruguay = Montevideo
Uzbekistan = Tashkent
Venezuela = Caracas
Vietnam = Hanoi
Yemen = Sanaa | Sana'a
Zambia = Lusaka
Zimbabwe = Harare
"""

CURRENCIES = """
Afghanistan = Afghan afghani | afghani
Albania = Albanian lek | lek
Algeria = Algerian dinar | dinar
Angola = Angolan kwanza | kwanza
Argentina = Argentine peso | peso | Argentinian peso
Armenia = Armenian dram | dram
Australia = Australian dollar | dollar
Austria = euro
Azerbaijan = Azerbaijani manat | manat
Bahrain = Bahraini dinar | dinar
Bangladesh = Bangladeshi taka | taka
Belarus = Belarusian ruble | ruble | Belarusian rouble | rouble
Bhutan = Bhutanese ngultrum | ngultrum
Bolivia = Bolivian boliviano | boliviano
Botswana = Botswana pula | pula
Brazil = Brazilian real | real
Cambodia = Cambodian riel | riel
Canada = Canadian dollar | dollar
Chile = Chilean peso | peso
China = renminbi | yuan | Chinese yuan | Chinese renminbi | yuan renminbi
Colombia = Colombian peso | peso
Costa Rica = Costa Rican colón | colón
Croatia = euro
Cuba = Cuban peso | peso
Czech Republic = Czech koruna | koruna | Czech crown | crown
Denmark = Danish krone | krone
Ecuador = United States dollar | US dollar | dollar | American dollar
Egypt = Egyptian pound | pound
Ethiopia = Ethiopian birr | birr
Fiji = Fijian dollar | dollar
Finland = euro
France = euro
Germany = euro
Ghana = Ghanaian cedi | cedi | Ghana cedi
Greece = euro
Guatemala = Guatemalan quetzal | quetzal
Haiti = Haitian gourde | gourde
Honduras = Honduran lempira | lempira
Hungary = Hungarian forint | forint
Iceland = Icelandic króna | króna | Icelandic krona
Indonesia = Indonesian rupiah | rupiah
Iran = Iranian rial | rial
Iraq = Iraqi dinar | dinar
Ireland = euro
Israel = Israeli new shekel | new shekel | shekel | Israeli shekel | new Israeli shekel
Italy = euro
Jamaica = Jamaican dollar | dollar
Japan = Japanese yen | yen
Jordan = Jordanian dinar | dinar
Kazakhstan = Kazakhstani tenge | tenge
Kenya = Kenyan shilling | shilling
Kuwait = Kuwaiti dinar | dinar
Kyrgyzstan = Kyrgyzstani som | som
Laos = Lao kip | kip | Laotian kip
Lebanon = Lebanese pound | pound | Lebanese lira | lira
Libya = Libyan dinar | dinar
Madagascar = Malagasy ariary | ariary
Malawi = Malawian kwacha | kwacha
Malaysia = Malaysian ringgit | ringgit
Mongolia = Mongolian tögrög | tögrög | tugrik | Mongolian tugrik
Morocco = Moroccan dirham | dirham
Mozambique = Mozambican metical | metical
Myanmar = Burmese kyat | kyat | Myanmar kyat
Nepal = Nepalese rupee | rupee | Nepali rupee
Netherlands = euro
New Zealand = New Zealand dollar | dollar
Nicaragua = Nicaraguan córdoba | córdoba
Nigeria = Nigerian naira | naira
North Korea = North Korean won | won
North Macedonia = Macedonian denar | denar
Norway = Norwegian krone | krone
Oman = Omani rial | rial
Pakistan = Pakistani rupee | rupee
Papua New Guinea = Papua New Guinean kina | kina
Paraguay = Paraguayan guaraní | guaraní
Peru = Peruvian sol | sol | nuevo sol
Philippines = Philippine peso | peso | Filipino peso
Poland = Polish złoty | złoty | zloty | Polish zloty
Portugal = euro
Qatar = Qatari riyal | riyal
Romania = Romanian leu | leu
Russia = Russian ruble | ruble | rouble | Russian rouble
Rwanda = Rwandan franc | franc
Saudi Arabia = Saudi riyal | riyal
Serbia = Serbian dinar | dinar
Singapore = Singapore dollar | Singaporean dollar | dollar
Somalia = Somali shilling | shilling
South Africa = South African rand | rand
South Korea = South Korean won | won | Korean won
Spain = euro
Sri Lanka = Sri Lankan rupee | rupee
Sudan = Sudanese pound | pound
Sweden = Swedish krona | krona
Syria = Syrian pound | pound
Tajikistan = Tajikistani somoni | somoni
Tanzania = Tanzanian shilling | shilling
Thailand = Thai baht | baht
Tunisia = Tunisian dinar | dinar
Turkey = Turkish lira | lira
Uganda = Ugandan shilling | shilling
Ukraine = Ukrainian hryvnia | hryvnia
United Arab Emirates = UAE dirham | dirham | Emirati dirham | United Arab Emirates dirham
United Kingdom = pound sterling | pound | British pound | sterling
United States = United States dollar | US dollar | dollar | American dollar
Uzbekistan = Uzbekistani som | som | Uzbek som
Vietnam = Vietnamese đồng | đồng | dong
Zambia = Zambian kwacha | kwacha
"""

LANGUAGES = """
Afghanistan = Pashto | Dari | Persian
Albania = Albanian
Algeria = Arabic | Tamazight | Berber
Angola = Portuguese
Argentina = Spanish
Armenia = Armenian
Austria = German
Azerbaijan = Azerbaijani | Azeri
Bangladesh = Bengali | Bangla
Belarus = Belarusian | Russian
Belgium = Dutch | French | German
Bhutan = Dzongkha
Bolivia = Spanish | Quechua | Aymara | Guaraní
Brazil = Portuguese
Bulgaria = Bulgarian
Cambodia = Khmer
Cameroon = French | English
Canada = English | French
Chile = Spanish
China = Mandarin | Chinese | Standard Chinese | Mandarin Chinese
Colombia = Spanish
Costa Rica = Spanish
Croatia = Croatian
Cuba = Spanish
Cyprus = Greek | Turkish
Czech Republic = Czech
Denmark = Danish
Dominican Republic = Spanish
Ecuador = Spanish
Egypt = Arabic
Estonia = Estonian
Ethiopia = Amharic | Oromo | Tigrinya | Somali | Afar
Finland = Finnish | Swedish
France = French
Germany = German
Greece = Greek
Guatemala = Spanish
Haiti = French | Haitian Creole | Creole
Honduras = Spanish
Hungary = Hungarian
Iceland = Icelandic
India = Hindi | English
Indonesia = Indonesian | Bahasa Indonesia
Iran = Persian | Farsi
Iraq = Arabic | Kurdish
Ireland = Irish | English | Gaelic | Irish Gaelic
Israel = Hebrew
Jordan = Arabic
Kazakhstan = Kazakh | Russian
Kuwait = Arabic
Kyrgyzstan = Kyrgyz | Russian
Laos = Lao | Laotian
Latvia = Latvian
Lebanon = Arabic
Libya = Arabic
Lithuania = Lithuanian
Luxembourg = Luxembourgish | French | German
Madagascar = Malagasy | French
Malaysia = Malay | Bahasa Malaysia | Malaysian
Malta = Maltese | English
Mexico = Spanish
Moldova = Romanian | Moldovan
Mongolia = Mongolian
Morocco = Arabic | Berber | Tamazight | Amazigh
Mozambique = Portuguese
Myanmar = Burmese | Myanmar
Nepal = Nepali | Nepalese
Netherlands = Dutch
New Zealand = English | Māori | New Zealand Sign Language
Nicaragua = Spanish
North Korea = Korean
North Macedonia = Macedonian | Albanian
Norway = Norwegian
Oman = Arabic
Pakistan = Urdu | English
Panama = Spanish
Paraguay = Spanish | Guaraní
Peru = Spanish | Quechua | Aymara
Philippines = Filipino | English | Tagalog
Portugal = Portuguese
Qatar = Arabic
Romania = Romanian
Russia = Russian
Rwanda = Kinyarwanda | English | French | Swahili
Saudi Arabia = Arabic
Serbia = Serbian
Singapore = English | Malay | Mandarin | Chinese | Tamil
Slovakia = Slovak
Slovenia = Slovene | Slovenian
Somalia = Somali | Arabic
South Korea = Korean
Spain = Spanish | Castilian
Sri Lanka = Sinhala | Tamil | Sinhalese
Sweden = Swedish
Switzerland = German | French | Italian | Romansh
Syria = Arabic
Tajikistan = Tajik
Tanzania = Swahili | English
Thailand = Thai
Tunisia = Arabic
Turkey = Turkish
Turkmenistan = Turkmen
Ukraine = Ukrainian
United Arab Emirates = Arabic
Uruguay = Spanish
Uzbekistan = Uzbek
Venezuela = Spanish
Vietnam = Vietnamese
Yemen = Arabic
"""

SYMBOLS = """
hydrogen = H
helium = He
lithium = Li
beryllium = Be
boron = B
carbon = C
nitrogen = N
fluorine = F
neon = Ne
magnesium = Mg
aluminium = Al
silicon = Si
phosphorus = P
sulfur = S
argon = Ar
potassium = K
calcium = Ca
scandium = Sc
titanium = Ti
vanadium = V
chromium = Cr
manganese = Mn
iron = Fe
cobalt = Co
nickel = Ni
copper = Cu
zinc = Zn
gallium = Ga
germanium = Ge
arsenic = As
selenium = Se
bromine = Br
krypton = Kr
rubidium = Rb
strontium = Sr
yttrium = Y
zirconium = Zr
niobium = Nb
molybdenum = Mo
technetium = Tc
ruthenium = Ru
rhodium = Rh
palladium = Pd
silver = Ag
cadmium = Cd
indium = In
tin = Sn
antimony = Sb
tellurium = Te
iodine = I
xenon = Xe
caesium = Cs
barium = Ba
lanthanum = La
cerium = Ce
neodymium = Nd
europium = Eu
gadolinium = Gd
hafnium = Hf
tantalum = Ta
tungsten = W
rhenium = Re
osmium = Os
iridium = Ir
platinum = Pt
gold = Au
mercury = Hg
thallium = Tl
lead = Pb
bismuth = Bi
polonium = Po
radon = Rn
francium = Fr
radium = Ra
actinium = Ac
thorium = Th
uranium = U
plutonium = Pu
americium = Am
curium = Cm
einsteinium = Es
nobelium = No
"""

AUTHORS = """
Pride and Prejudice = Jane Austen | Austen
Sense and Sensibility = Jane Austen | Austen
Emma = Jane Austen | Austen
1984 = George Orwell | Orwell
Animal Farm = George Orwell | Orwell
War and Peace = Leo Tolstoy | Tolstoy | Lev Tolstoy
Anna Karenina = Leo Tolstoy | Tolstoy | Lev Tolstoy
Moby-Dick = Herman Melville | Melville
The Great Gatsby = F. Scott Fitzgerald | Scott Fitzgerald | Fitzgerald | Francis Scott Fitzgerald
Crime and Punishment = Fyodor Dostoevsky | Dostoevsky | Dostoyevsky | Fyodor Dostoyevsky
The Brothers Karamazov = Fyodor Dostoevsky | Dostoevsky | Dostoyevsky | Fyodor Dostoyevsky
Oliver Twist = Charles Dickens | Dickens
A Tale of Two Cities = Charles Dickens | Dickens
Great Expectations = Charles Dickens | Dickens
Frankenstein = Mary Shelley | Mary Wollstonecraft Shelley
The Divine Comedy = Dante Alighieri | Dante
Les Misérables = Victor Hugo | Hugo
The Hunchback of Notre-Dame = Victor Hugo | Hugo
Ulysses = James Joyce | Joyce
The Old Man and the Sea = Ernest Hemingway | Hemingway
A Farewell to Arms = Ernest Hemingway | Hemingway
Madame Bovary = Gustave Flaubert | Flaubert
Dracula = Bram Stoker | Stoker
Jane Eyre = Charlotte Brontë
Wuthering Heights = Emily Brontë
To Kill a Mockingbird = Harper Lee
The Hobbit = J. R. R. Tolkien | Tolkien | J.R.R. Tolkien | John Ronald Reuel Tolkien
The Lord of the Rings = J. R. R. Tolkien | Tolkien | J.R.R. Tolkien | John Ronald Reuel Tolkien
The Adventures of Tom Sawyer = Mark Twain | Twain | Samuel Clemens
Adventures of Huckleberry Finn = Mark Twain | Twain | Samuel Clemens
The Catcher in the Rye = J. D. Salinger | Salinger | J.D. Salinger
Brave New World = Aldous Huxley | Huxley
Lolita = Vladimir Nabokov | Nabokov
One Hundred Years of Solitude = Gabriel García Márquez | García Márquez | Márquez | Gabriel Garcia Marquez
The Iliad = Homer
Hamlet = William Shakespeare | Shakespeare
Romeo and Juliet = William Shakespeare | Shakespeare
Macbeth = William Shakespeare | Shakespeare
Othello = William Shakespeare | Shakespeare
King Lear = William Shakespeare | Shakespeare
Alice's Adventures in Wonderland = Lewis Carroll | Carroll | Charles Dodgson
Robinson Crusoe = Daniel Defoe | Defoe
Gulliver's Travels = Jonathan Swift | Swift
The Picture of Dorian Gray = Oscar Wilde | Wilde
The Time Machine = H. G. Wells | Wells | H.G. Wells
The War of the Worlds = H. G. Wells | Wells | H.G. Wells
Twenty Thousand Leagues Under the Seas = Jules Verne | Verne
Around the World in Eighty Days = Jules Verne | Verne
The Count of Monte Cristo = Alexandre Dumas | Dumas
The Three Musketeers = Alexandre Dumas | Dumas
The Metamorphosis = Franz Kafka | Kafka
The Trial = Franz Kafka | Kafka
The Stranger = Albert Camus | Camus
Of Mice and Men = John Steinbeck | Steinbeck
The Grapes of Wrath = John Steinbeck | Steinbeck
Fahrenheit 451 = Ray Bradbury | Bradbury
The Little Prince = Antoine de Saint-Exupéry | Saint-Exupéry
The Jungle Book = Rudyard Kipling | Kipling
Treasure Island = Robert Louis Stevenson | Stevenson
The Canterbury Tales = Geoffrey Chaucer | Chaucer
Paradise Lost = John Milton | Milton
Heart of Darkness = Joseph Conrad | Conrad
Mrs Dalloway = Virginia Woolf | Woolf
Little Women = Louisa May Alcott | Alcott
Uncle Tom's Cabin = Harriet Beecher Stowe | Beecher Stowe
The Scarlet Letter = Nathaniel Hawthorne | Hawthorne
The Call of the Wild = Jack London
Doctor Zhivago = Boris Pasternak | Pasternak
The Master and Margarita = Mikhail Bulgakov | Bulgakov
The Prince = Niccolò Machiavelli | Machiavelli
The Art of War = Sun Tzu | Sunzi | Sun Zi
Charlie and the Chocolate Factory = Roald Dahl | Dahl
The Hound of the Baskervilles = Arthur Conan Doyle | Conan Doyle | Sir Arthur Conan Doyle
Murder on the Orient Express = Agatha Christie | Christie
The Lion, the Witch and the Wardrobe = C. S. Lewis | C.S. Lewis
Peter Pan = J. M. Barrie | Barrie | J.M. Barrie
Winnie-the-Pooh = A. A. Milne | Milne | A.A. Milne
On the Origin of Species = Charles Darwin | Darwin
A Brief History of Time = Stephen Hawking | Hawking
Candide = Voltaire
Siddhartha = Hermann Hesse | Hesse
The Name of the Rose = Umberto Eco | Eco
The Alchemist = Paulo Coelho | Coelho
Things Fall Apart = Chinua Achebe | Achebe
The Handmaid's Tale = Margaret Atwood | Atwood
Gone with the Wind = Margaret Mitchell
Lord of the Flies = William Golding | Golding
Catch-22 = Joseph Heller | Heller
Slaughterhouse-Five = Kurt Vonnegut | Vonnegut
On the Road = Jack Kerouac | Kerouac
Dune = Frank Herbert
Foundation = Isaac Asimov | Asimov
"""

RELATIONS: tuple[Relation, ...] = (
    Relation(
        "capital",
        "The capital of {subject} is {answer}.",
        (("Italy", "Rome"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")),
        CAPITALS,
    ),
    Relation(
        "currency",
        "The currency of {subject} is the {answer}.",
        (("Switzerland", "Swiss franc"), ("Mexico", "Mexican peso"), ("India", "Indian rupee")),
        CURRENCIES,
    ),
    Relation(
        "language",
        "The official language of {subject} is {answer}.",
        (("Italy", "Italian"), ("Japan", "Japanese"), ("Poland", "Polish")),
        LANGUAGES,
    ),
    Relation(
        "symbol",
        "The chemical symbol for {subject} is {answer}.",
        (("oxygen", "O"), ("sodium", "Na"), ("chlorine", "Cl")),
        SYMBOLS,
    ),
    Relation(
        "author",
        "{subject} was written by {answer}.",
        (("Don Quixote", "Miguel de Cervantes"), ("The Odyssey", "Homer"), ("Faust", "Johann Wolfgang von Goethe")),
        AUTHORS,
    ),
)


def parse_table(table: str) -> list[tuple[str, tuple[str, ...]]]:
    """`subject = answer | alias` lines as (subject, accepted answers), in table order."""
    rows = []
    for line in table.strip().splitlines():
        subject, _, answers = line.partition(" = ")
        rows.append((subject.strip(), tuple(answer.strip() for answer in answers.split(" | "))))
    return rows
